"""Calibration: text → token windows, capture of block-0 inputs, and the activation cache."""
