"""Perplexity on non-overlapping windows, as Wanda and SparseGPT report it.

Windows are framed as the model reads its inputs (``calib.framing``): for a tokenizer that adds a
BOS, each window is the BOS plus T-1 text tokens and the BOS position itself is not scored.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from calib.framing import resolve_framing
from calib.text_sources import HUB_EVAL_SPLITS, consecutive_windows, read_text, tokenize_text
from reconstruct.modelio.architecture import load_config
from reconstruct.modelio.source import resolve_model
from reconstruct.runtime import model_dtype, resolve_device
from reconstruct.evaluation.streaming import open_lm
from reconstruct.modelio.facts import resolve_eval_seq_len

logger = logging.getLogger(__name__)


@torch.no_grad()
def window_nll(lm, windows: torch.Tensor, batch_size: int = 1) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over ``windows`` (n, T), and the token count.

    Args:
        lm: an ``InMemoryLM`` or ``StreamedLM`` (``reconstruct.evaluation.streaming``).
        windows: (n, T) token ids.
        batch_size: windows per forward.
    """
    total, count = 0.0, 0
    for _, rows, logits in lm.logits([windows], batch_size):
        loss, scored = next_token_nll(logits, windows[rows])
        total += loss
        count += scored
    return total, count


def next_token_nll(logits: torch.Tensor, batch: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of (b, T) windows from their (b, T, V) logits, in float32,
    and the number of tokens scored (b (T - 1))."""
    batch = batch.to(logits.device)  # (b, T)
    logits = logits.float()  # (b, T, V)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
    )
    return loss.item(), batch[:, 1:].numel()


def perplexity(
    model: str,
    data: str,
    seq_len: int | None = None,
    max_windows: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 1,
    stream: bool | None = None,
    bos: str = "auto",
) -> dict:
    """Perplexity of ``model`` on the test text ``data``.

    Args:
        model: folder, .gguf, alias or hub id.
        data: a local .txt/.jsonl file or a dataset name (its test split).
        seq_len: tokens per window; windows do not overlap. ``None``: the smaller of 2048 and the
            model's context length.
        max_windows: evaluate only the first windows (None: all).
        batch_size: windows per forward.
        stream: run the model one block at a time (None: when it does not fit in memory).
        bos: ``--calib-bos``: ``auto`` (a BOS first when the tokenizer adds one), ``always`` or ``never``.

    Returns:
        ``{"perplexity", "windows", "tokens", "seconds", "streamed", "bos_id"}`` (``bos_id``: the
        token each window starts with, None for text only).
    """
    from transformers import AutoTokenizer

    folder = resolve_model(model)
    config = load_config(folder)
    seq_len = resolve_eval_seq_len(seq_len, config, "--max-length")  # before any work
    torch_device = resolve_device(device)
    torch_dtype = model_dtype(dtype, torch_device, config)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    framing = resolve_framing(tokenizer, bos)
    ids = tokenize_text(read_text(data, split=HUB_EVAL_SPLITS.get(data)), tokenizer)
    windows = consecutive_windows(ids, seq_len, max_windows, framing=framing)  # (n, T)
    lm = open_lm(folder, torch_device, torch_dtype, stream)
    nll, count = window_nll(lm, windows, batch_size)
    result = {
        "perplexity": math.exp(nll / count),
        "windows": int(windows.shape[0]),
        "tokens": int(windows.numel()),
        "seconds": time.perf_counter() - started,
        "streamed": lm.streamed,
        **framing.record(),
    }
    logger.info("perplexity %.3f on %d windows of %d tokens", result["perplexity"], windows.shape[0], seq_len)
    return result
