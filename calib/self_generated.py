"""Data-free calibration: sequences sampled from the dense model itself.

Each sequence starts the way the model's inputs start (``calib.framing``): from the BOS when the
tokenizer adds one, else from a token drawn uniformly from the vocabulary; it continues by plain
sampling (temperature 1, no top-k/top-p) with end-of-sequence suppressed until ``seq_len``, the
data-free recipe of LLM-QAT (Liu et al., 2023). It needs the whole model in memory, so it is meant
for models that fit; larger models should calibrate on text.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from calib.framing import SequenceFraming

logger = logging.getLogger(__name__)


def generate_self_calibration(
    model_folder: Path,
    n_samples: int,
    seq_len: int,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 16,
    *,
    framing: SequenceFraming | None = None,
    on_tokens: Callable[[int], object] | None = None,
) -> torch.Tensor:
    """Sample ``n_samples`` sequences of ``seq_len`` tokens from the model, shape (n, T), int64 on CPU.

    ``framing`` (default: no BOS) decides the first token: its BOS, or a seeded uniform draw.
    ``on_tokens`` (e.g. a progress bar's ``update``) is called with the number of tokens generated
    at every step, ``n_samples * (seq_len - 1)`` in all; it does not change the samples.
    """
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=dtype).to(device).eval()
    vocab_size = model.get_input_embeddings().weight.shape[0]
    first_tokens = _first_tokens(framing or SequenceFraming(), n_samples, vocab_size, seed)  # (n, 1)
    sequences = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, n_samples, batch_size):
            prompt = first_tokens[start : start + batch_size].to(device)  # (b, 1)
            out = model.generate(
                prompt,
                logits_processor=LogitsProcessorList([_TickPerToken(on_tokens, prompt.shape[0])]),
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=seq_len - 1,
                min_new_tokens=seq_len - 1,
                pad_token_id=model.config.eos_token_id if model.config.pad_token_id is None else model.config.pad_token_id,
            )
            sequences.append(out[:, :seq_len].cpu())  # (b, T)
            logger.debug("self-calibration: %d/%d sequences", min(start + batch_size, n_samples), n_samples)
    del model
    return torch.cat(sequences)  # (n, T)


def _first_tokens(framing: SequenceFraming, n_samples: int, vocab_size: int, seed: int) -> torch.Tensor:
    """The prompt of every sequence, shape (n, 1): the BOS, or tokens drawn uniformly (seeded)."""
    if framing.bos_id is not None:
        return torch.full((n_samples, 1), framing.bos_id, dtype=torch.long)  # (n, 1)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n_samples, 1), generator=generator)  # (n, 1)


class _TickPerToken:
    """A logits processor that changes nothing and reports one token per sequence per step.

    ``generate`` calls it once per generated position, so a progress bar moves from the first token
    on; it draws no random numbers, so the sampled sequences are the same with or without it.
    """

    def __init__(self, on_tokens: Callable[[int], object] | None, batch: int):
        self.on_tokens = on_tokens
        self.batch = batch

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Return ``scores`` (b, V) unchanged after reporting ``batch`` new tokens."""
        if self.on_tokens is not None:
            self.on_tokens(self.batch)
        return scores
