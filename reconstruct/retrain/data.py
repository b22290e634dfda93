"""Retraining data: seeded token windows of ``--data``, a held-out split, and each step's windows."""

from __future__ import annotations

import logging

import torch

from calib.framing import SequenceFraming
from calib.self_generated import generate_self_calibration
from calib.text_sources import SELF, read_text, sample_windows, tokenize_text
from reconstruct.methods.samples import SampleSplit, split_samples
from reconstruct.modelio.loaded import LoadedModel

logger = logging.getLogger(__name__)


def retrain_windows(loaded: LoadedModel, source: str, *, n_windows: int, seq_len: int, seed: int,
                    framing: SequenceFraming) -> torch.Tensor:
    """``n_windows`` token windows of ``seq_len`` from ``source`` (any ``--calib`` source), (n, T) int64.

    Raises:
        ValueError: the text is empty or has fewer tokens than one window (naming ``--data``).
    """
    if source == SELF:
        logger.info("sampling %d × %d retraining tokens from the model itself", n_windows, seq_len)
        return generate_self_calibration(loaded.folder, n_windows, seq_len, seed, loaded.device, loaded.dtype,
                                         framing=framing)
    ids = tokenize_text(read_text(source), loaded.tokenizer())  # (L,)
    needed = framing.text_length(seq_len) + 1
    if ids.numel() < needed:
        raise ValueError(f"--data {source} has {ids.numel()} tokens; a window of --seq-len {seq_len} needs "
                         f"at least {needed}: give more text or a shorter --seq-len")
    return sample_windows(ids, n_windows, seq_len, seed, framing=framing)


def held_out_split(n_windows: int, val_fraction: float, seed: int) -> SampleSplit:
    """Training and validation windows, seeded (the same on every rank and every resume)."""
    return split_samples(n_windows, val_fraction, seed)


def step_rows(train: torch.Tensor, batch: int, step: int, seed: int) -> torch.Tensor:
    """The training windows of optimizer step ``step`` (0-based), (batch,) int64 global row indices.

    Windows are taken in order from a seeded permutation of ``train`` per epoch, so step ``s`` depends
    on the seed and ``s`` alone (the data position of a resume is the step). A batch may straddle two
    epochs; a batch larger than the training set repeats windows.
    """
    n = train.numel()
    rows = []
    for position in range(step * batch, (step + 1) * batch):
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        rows.append(int(train[order[offset]]))
    return torch.tensor(rows, dtype=torch.long)
