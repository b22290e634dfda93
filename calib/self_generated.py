"""Data-free calibration: sequences sampled from the dense model itself.

Each sequence starts the way the model's inputs start (``calib.framing``): from the BOS when the
tokenizer adds one, else from a token drawn uniformly from the vocabulary; it continues by plain
sampling (temperature 1, no top-k/top-p) with end-of-sequence suppressed until ``seq_len``, the
data-free recipe of LLM-QAT (Liu et al., 2023). It needs the whole model in memory, so it is meant
for models that fit; larger models should calibrate on text.

Sampling is checkpointed: each batch of sequences grows in a fixed number of chunks
(``CHUNKS_PER_BATCH``, a function of ``seq_len`` alone), and after every chunk ``on_checkpoint``
receives a ``SamplingState`` (the sequences so far and the random number generators' state). Given
back as ``resume``, it continues exactly where it stopped: an interrupted and resumed run samples
the same tokens as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from calib.framing import SequenceFraming

logger = logging.getLogger(__name__)

CHUNKS_PER_BATCH = 8  # checkpoints per batch of sequences; each costs one forward over the prefix


@dataclass
class SamplingState:
    """How far sampling got: finished sequences, the batch being grown, the generators' state."""

    done: torch.Tensor  # (k, T) int64, finished sequences (k a multiple of the batch size)
    batch: torch.Tensor  # (b, t) int64, the current batch's first t tokens (t = 0: not started)
    rng: dict[str, torch.Tensor]  # "cpu" and, on CUDA, "cuda": the generators' state after ``batch``

    def tokens_done(self) -> int:
        """Tokens sampled so far (the first token of each sequence is given, not sampled)."""
        sampled_done = self.done.shape[0] * max(0, self.done.shape[1] - 1) if self.done.numel() else 0
        return sampled_done + self.batch.shape[0] * max(0, self.batch.shape[1] - 1)


def chunk_length(seq_len: int) -> int:
    """New tokens per chunk: ``seq_len - 1`` split in ``CHUNKS_PER_BATCH`` (at least 1)."""
    return max(1, math.ceil((seq_len - 1) / CHUNKS_PER_BATCH))


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
    resume: SamplingState | None = None,
    on_checkpoint: Callable[[SamplingState], object] | None = None,
) -> torch.Tensor:
    """Sample ``n_samples`` sequences of ``seq_len`` tokens from the model, shape (n, T), int64 on CPU.

    ``framing`` (default: no BOS) decides the first token: its BOS, or a seeded uniform draw.
    ``on_tokens`` (e.g. a progress bar's ``update``) is called with the number of tokens generated
    at every step, ``n_samples * (seq_len - 1)`` in all (less the ``resume`` state's); it does not
    change the samples. ``on_checkpoint`` gets the state after every chunk; ``resume`` continues one.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=dtype).to(device).eval()
    vocab_size = model.get_input_embeddings().weight.shape[0]
    first_tokens = _first_tokens(framing or SequenceFraming(), n_samples, vocab_size, seed)  # (n, 1)
    cuda = [device] if device.type == "cuda" else []
    sequences = [resume.done] if resume is not None and resume.done.numel() else []
    with torch.random.fork_rng(devices=cuda):
        if resume is None:
            torch.manual_seed(seed)
        else:
            _restore_rng(resume.rng, device)
        start = sum(part.shape[0] for part in sequences)
        partial = resume.batch if resume is not None and resume.batch.numel() else None
        while start < n_samples:
            batch = partial if partial is not None else first_tokens[start : start + batch_size]  # (b, t)
            partial = None
            while batch.shape[1] < seq_len:
                batch = _grow(model, batch.to(device), seq_len, on_tokens).cpu()  # (b, t + chunk)
                if on_checkpoint is not None:
                    finished = torch.cat(sequences) if sequences else torch.empty(0, seq_len, dtype=torch.long)
                    on_checkpoint(SamplingState(finished, batch, _rng_state(device)))
            sequences.append(batch)  # (b, T)
            start += batch.shape[0]
            logger.debug("self-calibration: %d/%d sequences", start, n_samples)
    del model
    return torch.cat(sequences)  # (n, T)


def _grow(model, prefix: torch.Tensor, seq_len: int, on_tokens) -> torch.Tensor:
    """One chunk: ``prefix`` (b, t) plus ``chunk_length(seq_len)`` sampled tokens (fewer at the end), (b, t')."""
    from transformers import LogitsProcessorList

    new = min(chunk_length(seq_len), seq_len - prefix.shape[1])
    out = model.generate(
        prefix,
        logits_processor=LogitsProcessorList([_TickPerToken(on_tokens, prefix.shape[0])]),
        attention_mask=torch.ones_like(prefix),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=new,
        min_new_tokens=new,  # end-of-sequence suppressed until seq_len
        pad_token_id=model.config.eos_token_id if model.config.pad_token_id is None else model.config.pad_token_id,
    )
    return out[:, : prefix.shape[1] + new]  # (b, t')


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


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
