"""Data parallelism under torchrun: split calibration samples, all-reduce statistics, rank 0 writes."""
