"""Model IO: resolve --model to a folder, discover the blocks, read tensors lazily, write the output folder."""
