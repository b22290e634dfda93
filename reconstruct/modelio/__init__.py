"""Model IO: the model source, architecture discovery, the checkpoint reader, block IO, the output folder."""
