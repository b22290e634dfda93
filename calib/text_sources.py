"""Calibration text → seeded token windows, from a local file or a ``datasets`` name."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

SELF = "self"
# name → (datasets path, config, split, text field). Used only when the user names one.
HUB_DATASETS: dict[str, tuple[str, str | None, str, str]] = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "text"),
    "c4": ("allenai/c4", "en", "validation", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "train", "sentence"),
}
HUB_EVAL_SPLITS = {"wikitext2": "test", "c4": "validation", "ptb": "test"}


def describe_sources() -> str:
    """The accepted values of ``--calib``, for error messages."""
    return f"{SELF}, {', '.join(HUB_DATASETS)} or a local .txt/.jsonl file"


def read_text(source: str, split: str | None = None) -> str:
    """Return the whole text of a calibration/evaluation source.

    Args:
        source: a ``.txt`` file (used as is), a ``.jsonl`` file (``text`` field of each line,
            joined by blank lines), or a name from ``HUB_DATASETS`` (downloaded with ``datasets``).
        split: for dataset names, the split to read (default: the calibration split).
    """
    path = Path(source).expanduser()
    if path.suffix in (".txt", ".jsonl") or path.exists():
        if not path.is_file():
            raise ValueError(f"calibration/evaluation file {source} does not exist")
        if path.suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            return "\n\n".join(json.loads(line)["text"] for line in lines if line.strip())
        return path.read_text(encoding="utf-8")
    if source not in HUB_DATASETS:
        raise ValueError(f"--calib/--data {source!r} is not a file or a known dataset; use {describe_sources()}")
    name, config, default_split, field = HUB_DATASETS[source]
    try:
        import datasets

        rows = datasets.load_dataset(name, config, split=split or default_split)
    except Exception as error:  # offline, missing dataset script, ...: one clear line
        raise ValueError(
            f"could not load dataset {source!r} ({type(error).__name__}); pass a local .txt/.jsonl file instead"
        ) from None
    return "\n\n".join(rows[field])


def tokenize_text(text: str, tokenizer) -> torch.Tensor:
    """Tokenize a whole text into one long id sequence, shape (L,)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids
    return ids[0]  # (L,)


def sample_windows(ids: torch.Tensor, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Draw ``n_samples`` windows of ``seq_len`` tokens at seeded random offsets, shape (n, T)."""
    if ids.numel() <= seq_len:
        raise ValueError(
            f"calibration text has {ids.numel()} tokens, fewer than --seq-len {seq_len}; use more text or a shorter --seq-len"
        )
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, ids.numel() - seq_len, size=n_samples)
    return torch.stack([ids[start : start + seq_len] for start in starts.tolist()])  # (n, T)


def consecutive_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """Non-overlapping windows from the start, as Wanda/SparseGPT evaluate perplexity, shape (n, T)."""
    n_windows = ids.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than --seq-len {seq_len}")
    return ids[: n_windows * seq_len].view(n_windows, seq_len)  # (n, T)
