"""Device, dtype and memory measurements; how the host allocator serves large tensors."""

from __future__ import annotations

import functools
import logging
import resource
import sys

import torch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto`` → the first CUDA device if there is one, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    """``auto`` → float32 on CPU, the checkpoint's dtype on a GPU."""
    if name == "auto":
        if device.type == "cpu" or checkpoint_dtype is None:
            return torch.float32
        return checkpoint_dtype
    if name not in DTYPES:
        raise ValueError(f"--dtype must be auto, {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def peak_gpu_mb(device: torch.device) -> float | None:
    """Peak memory allocated by torch on ``device`` so far, in MiB (None on CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def unpool_large_allocations(threshold: int = 1 << 20) -> None:
    """Serve every host allocation of ``threshold`` bytes or more with its own mmap (glibc only).

    glibc starts with a 128 KiB mmap threshold and raises it, up to 32 MiB, each time such a chunk
    is freed. After the first block is freed, every tensor below 32 MiB (weights, activations,
    statistics) comes from the heap, where blocks of ever-shifting sizes fragment it and peak RSS
    creeps up block after block (1.16 GB at 2 blocks, 2.04 GB at 16 in bench/memory.py). A fixed
    threshold (set through mallopt, which also stops the adjustment) returns each freed tensor to
    the OS at once, so host memory stays flat with depth. Elsewhere this is a no-op.
    """
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallopt"):
        logger.debug("mallopt unavailable; large allocations stay pooled")
        return
    libc.mallopt(-3, threshold)  # -3 = M_MMAP_THRESHOLD


@functools.lru_cache(maxsize=1)
def _glibc():
    """The C library when it is glibc on Linux, else None (looked up once: it is called after every block)."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def release_free_heap() -> None:
    """Give the free pages inside glibc's heaps back to the OS (``malloc_trim(0)``); elsewhere a no-op.

    Allocations under the mmap threshold (adapters, optimizer moments, norms, small activations,
    tokenizer buffers) come from heaps that only shrink from the top: the pages of chunks freed in
    the middle stay resident, and once a later allocation has touched them they count in RSS. Over a
    streamed retraining that loads every block twice a step, peak RSS then crept up with depth in
    some runs and not in others (thread arenas make it depend on scheduling). Trimming after each
    block is released returns those pages; it costs a walk over the heap's free chunks.
    """
    libc = _glibc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
