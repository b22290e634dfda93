"""Perplexity on non-overlapping windows, as Wanda and SparseGPT report it."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from calib.text_sources import HUB_EVAL_SPLITS, consecutive_windows, read_text, tokenize_text
from reconstruct.model_source import resolve_model
from reconstruct.runtime import resolve_device, resolve_dtype

logger = logging.getLogger(__name__)


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, device: torch.device, batch_size: int = 1) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over ``windows`` (n, T), and the token count."""
    total, count = 0.0, 0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc="eval", unit="batch", disable=None):
        batch = windows[start : start + batch_size].to(device)  # (b, T)
        logits = model(input_ids=batch, use_cache=False).logits.float()  # (b, T, V)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += batch[:, 1:].numel()
    return total, count


def perplexity(
    model: str,
    data: str,
    seq_len: int = 2048,
    max_windows: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 1,
) -> dict:
    """Perplexity of ``model`` on the test text ``data``.

    Args:
        model: folder, .gguf, alias or hub id.
        data: a local .txt/.jsonl file or a dataset name (its test split).
        seq_len: tokens per window; windows do not overlap.
        max_windows: evaluate only the first windows (None: all).

    Returns:
        ``{"perplexity", "windows", "tokens", "seconds"}``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(model)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device, None)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenize_text(read_text(data, split=HUB_EVAL_SPLITS.get(data)), tokenizer)
    windows = consecutive_windows(ids, seq_len, max_windows)  # (n, T)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype).to(torch_device).eval()
    nll, count = window_nll(lm, windows, torch_device, batch_size)
    result = {
        "perplexity": math.exp(nll / count),
        "windows": int(windows.shape[0]),
        "tokens": int(windows.numel()),
        "seconds": time.perf_counter() - started,
    }
    logger.info("perplexity %.3f on %d windows of %d tokens", result["perplexity"], windows.shape[0], seq_len)
    return result
