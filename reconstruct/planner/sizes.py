"""The byte formulas of the memory plan: what one stream, one set of statistics, one pruning step holds.

Constants are measured (the comment on each says where) or are estimates where no measurement was
possible; ``reconstruct plan`` adds them up phase by phase (``planner.phases``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from reconstruct.planner.budget import MIB

HOST_BASELINE_BYTES = 448 * MIB  # the process after load_model: imports, skeleton, tokenizer (400 MiB measured, CPU torch)
CUDA_HOST_EXTRA_BYTES = 1536 * MIB  # host pages of the CUDA libraries once a context exists (estimate)
CUDA_CONTEXT_BYTES = 512 * MIB  # GPU memory of the CUDA context and cuBLAS workspaces, outside torch's allocator
CUDA_ALLOCATOR_SLACK = 0.10  # caching-allocator fragmentation, as a share of the per-block working set
TOKENIZE_BYTES_PER_CHAR = 90  # host memory of a fast tokenizer over a whole text (measured ~85 on WikiText-2)
NAMED_TEXT_CHARS = {"wikitext2": 11_000_000, "ptb": 5_000_000, "c4": 800_000_000}  # split sizes, approximate
ARGSORT_ROW_BYTES = 12  # stable argsort along N:M groups: int64 order + float32 values (profiled on CPU)
KTHVALUE_ROW_BYTES = 15  # per-row selection: kthvalue's float32 copy and int64 indices, bool masks (profiled on CPU)
ARGSORT_FLAT_BYTES = 20  # stable argsort of a flattened layer: one more int64 index buffer (profiled on CPU)
ADAMW_TEMPORARIES = 2  # foreach AdamW temporaries, in units of the trainable parameters
GENERATE_BATCH = 16  # calib.self_generated batch size


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element of a floating dtype."""
    return torch.finfo(dtype).bits // 8


def stream_bytes(n_samples: int, seq_len: int, hidden: int, dtype: torch.dtype) -> int:
    """Bytes of one activation stream (n, T, H) in the compute dtype (calib.activations)."""
    return n_samples * seq_len * hidden * element_size(dtype)


def statistics_bytes(pruner: str, in_features: list[int]) -> int:
    """Bytes of the pruner statistics of linears with these input sizes (pruners.stats; float32 sums)."""
    if pruner == "wanda":
        return sum(4 * n + 8 for n in in_features)  # sum_sq (in,) float32 + int64 count
    if pruner == "sparsegpt":
        return sum(4 * n * n + 8 for n in in_features)  # xtx (in, in) float32 + int64 count
    return 0


def prune_temporary_bytes(pruner: str, out_features: int, in_features: int, dtype: torch.dtype, pattern) -> int:
    """Peak temporaries of ``loop.pruning.prune_layer`` for one (out, in) linear, statistics excluded."""
    oi = out_features * in_features
    clone = 4 * oi if dtype == torch.float32 else 8 * oi  # .float().clone(): two copies for a moment
    if pruner == "sparsegpt":
        # H, the Cholesky factor L, its inverse and cholesky_inverse's workspace: four in x in float32
        # (profiled: 3.75 of them on CPU), then U with the weight sweep.
        return 4 * oi + oi + 4 * 4 * in_features * in_features
    if pattern.kind == "unstructured" and pattern.scope == "row":
        selection = KTHVALUE_ROW_BYTES * min(oi, max(1 << 24, in_features))  # pruners.masks.ROW_CHUNK_ELEMENTS
    elif pattern.kind == "unstructured":
        selection = ARGSORT_FLAT_BYTES * oi  # one argsort over the whole layer
    else:
        selection = ARGSORT_ROW_BYTES * oi  # N:M: one argsort over every group of m
    scores = 8 * oi  # |W| and |W| * norm (wanda) / |W| (magnitude), float32
    select = 4 * oi + 4 * oi + oi + selection  # weight, scores, keep mask, selection temporaries
    check = 4 * oi + 3 * oi  # weight; keep mask, weight == 0 and their union (bool)
    return max(clone, 4 * oi + scores, select, check) + (element_size(dtype) * oi if dtype != torch.float32 else 0)


def unit_objective(recon) -> bool:
    """loop.pipeline.uses_unit_objective: sub-layer/linear granularity or local targets need a dense block copy."""
    return getattr(recon, "granularity", "block") != "block" or getattr(recon, "target", "dense") != "dense"


def text_chars(source: str) -> int:
    """Characters of a calibration text: a file's size, or the approximate size of a named dataset."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.stat().st_size
    return NAMED_TEXT_CHARS.get(source, 0)
