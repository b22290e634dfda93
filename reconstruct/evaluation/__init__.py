"""Evaluation of a model folder: perplexity (in memory or streamed block by block) and zero-shot tasks through lm-evaluation-harness."""
