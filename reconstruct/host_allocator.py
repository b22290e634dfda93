"""How glibc's allocator serves this process's tensors on the host (a no-op elsewhere); torch-free.

The command line fixes the mmap threshold before anything else runs (``cli``), so the large
temporaries made before a job starts (building the model's skeleton allocates every parameter on
the host before moving it to ``meta``) never grow the heap; the job entry points (``run_job``,
``run_retrain``) call it again, first thing, for callers that use them as a library.
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger(__name__)


def unpool_large_allocations(threshold: int = 1 << 20) -> None:
    """Serve every host allocation of ``threshold`` bytes or more with its own mmap (glibc only).

    glibc starts with a 128 KiB mmap threshold and raises it, up to 32 MiB, each time such a chunk
    is freed. After the first block is freed, every tensor below 32 MiB (weights, activations,
    statistics) comes from the heap, where blocks of ever-shifting sizes fragment it and peak RSS
    creeps up block after block (1.16 GB at 2 blocks, 2.04 GB at 16 in bench/memory.py). A fixed
    threshold (set through mallopt, which also stops the adjustment) returns each freed tensor to
    the OS at once, so host memory stays flat with depth. Elsewhere this is a no-op.

    Set it before the first large temporary: glibc serves a request from free heap space before it
    maps anything, so once earlier temporaries have grown the heap (building a 16-block skeleton left
    1 GB free in it in 10 runs of 16), the blocks' tensors come from there whatever the threshold, and
    a streamed retraining then peaked 150-170 MB higher at 16 blocks.
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


def release_free_heap(slack: int = 0) -> None:
    """Give the free pages inside glibc's heaps back to the OS (``malloc_trim(0)``); elsewhere a no-op.

    Allocations under the mmap threshold (adapters, optimizer moments, norms, small activations,
    tokenizer buffers) come from heaps that only shrink from the top: the pages of chunks freed in
    the middle stay resident, and once a later allocation has touched them they count in RSS.
    Trimming after each block of a streamed retraining is released returns those pages; it costs a
    walk over the heap's free chunks, and every page returned that the next block touches again is
    a page fault (on a 2-core CPU, trimming after each of SmolLM2's 60 block sessions of a step cost
    13% of the step).

    Args:
        slack: trim only when the heaps hold more free bytes than this (glibc's ``mallinfo2``): free
            space the next block reuses stays, RSS stays within ``slack`` of what is in use.
    """
    libc = _glibc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return
    if slack and free_heap_bytes() < slack:
        return
    libc.malloc_trim(0)


def free_heap_bytes() -> int:
    """Bytes free inside glibc's heaps (``mallinfo2``: ordinary and fast bins); 2**62 when it cannot tell."""
    import ctypes

    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return 1 << 62

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return int(info.fordblks + info.fsmblks)
