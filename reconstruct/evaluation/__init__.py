"""Evaluation of a model folder: perplexity (in memory or streamed block by block) and zero-shot accuracy."""
