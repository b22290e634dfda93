"""Calibration text → seeded token windows, from a local file or a ``datasets`` name."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from calib.framing import SequenceFraming

logger = logging.getLogger(__name__)

SELF = "self"
# name → (datasets path, config, split, text field). Used only when the user names one.
HUB_DATASETS: dict[str, tuple[str, str | None, str, str]] = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "text"),
    "c4": ("allenai/c4", "en", "validation", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "train", "sentence"),
}
HUB_EVAL_SPLITS = {"wikitext2": "test", "c4": "validation", "ptb": "test"}
HUB_URL = "https://huggingface.co"


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
    online = hub_reachable()
    if not online:  # the datasets cache alone: an answer in seconds instead of half a minute of retries
        _go_offline()
    try:
        import datasets

        rows = datasets.load_dataset(name, config, split=split or default_split)
    except Exception as error:  # offline, missing dataset script, ...: one clear line
        why = "the Hugging Face hub is unreachable and it is not cached" if not online else type(error).__name__
        raise ValueError(
            f"could not load dataset {source!r} ({why}); pass a local .txt/.jsonl file instead"
        ) from None
    return "\n\n".join(rows[field])


def check_dataset_available(source: str) -> None:
    """Fail now, in seconds, when ``source`` names a dataset that cannot be had (offline, not cached).

    Online, or for files and ``self``, nothing is done: the download happens when the text is read.

    Raises:
        ValueError: with the local-file hint, as ``read_text`` does.
    """
    if source in HUB_DATASETS and not hub_reachable():
        read_text(source)  # offline: from the datasets cache, or the one-line refusal


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` seconds.

    Behind a proxy (``HTTPS_PROXY``) the hub is assumed reachable: the client knows the way.
    """
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT") or HUB_URL).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _go_offline() -> None:
    """Tell ``datasets`` and ``huggingface_hub`` to use their caches only (no retries)."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    for module, attribute in (("datasets.config", "HF_DATASETS_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                              ("huggingface_hub.constants", "HF_HUB_OFFLINE")):
        loaded = sys.modules.get(module)  # already imported: its flag was read at import time
        if loaded is not None and hasattr(loaded, attribute):
            setattr(loaded, attribute, True)


def tokenize_text(text: str, tokenizer) -> torch.Tensor:
    """Tokenize a whole text into one long id sequence, shape (L,)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids
    return ids[0]  # (L,)


def sample_windows(ids: torch.Tensor, n_samples: int, seq_len: int, seed: int, *,
                   framing: SequenceFraming | None = None) -> torch.Tensor:
    """Draw ``n_samples`` windows of ``seq_len`` tokens at seeded random offsets, shape (n, T).

    Args:
        ids: the whole text's token ids, (L,).
        n_samples: windows to draw.
        seq_len: tokens per window, the BOS included when ``framing`` has one.
        seed: seeds the offsets.
        framing: how each window starts (default: text only, no BOS).
    """
    framing = framing or SequenceFraming()
    text_len = framing.text_length(seq_len)
    if ids.numel() <= text_len:
        raise ValueError(
            f"calibration text has {ids.numel()} tokens, fewer than --seq-len {seq_len}; use more text or a shorter --seq-len"
        )
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, ids.numel() - text_len, size=n_samples)
    text = torch.stack([ids[start : start + text_len] for start in starts.tolist()])  # (n, T or T-1)
    return framing.frame(text)  # (n, T)


def consecutive_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None, *,
                        framing: SequenceFraming | None = None) -> torch.Tensor:
    """Non-overlapping windows from the start, as Wanda/SparseGPT evaluate perplexity, shape (n, T).

    With a BOS in ``framing`` each window is the BOS plus the next T-1 text tokens (as lm-eval
    frames them for such models), so every text token is predicted once; without, T text tokens.
    """
    framing = framing or SequenceFraming()
    text_len = framing.text_length(seq_len)
    n_windows = ids.numel() // text_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than --seq-len {seq_len}")
    return framing.frame(ids[: n_windows * text_len].view(n_windows, text_len))  # (n, T)
