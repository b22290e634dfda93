"""reconstruct: prune LLMs block by block and repair them by layer-wise reconstruction."""

__version__ = "0.1.0"
