"""The block loop: stream each block in, prune it, reconstruct it, propagate the activations, write it."""
