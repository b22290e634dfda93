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


_FREE_AFTER_LAST_TRIM = {"bytes": 0}  # the heaps' free bytes right after the last trim (slack is measured from it)


def release_free_heap(slack: int = 0) -> None:
    """Give the free pages inside glibc's heaps back to the OS (``malloc_trim(0)``); elsewhere a no-op.

    Allocations under the mmap threshold (adapters, optimizer moments, norms, small activations,
    tokenizer buffers) come from heaps that only shrink from the top: the pages of chunks freed in
    the middle stay resident, and once a later allocation has touched them they count in RSS.
    Trimming returns those pages; it costs a walk over the heap's free chunks, and every page
    returned that the next block touches again is a page fault.

    Args:
        slack: trim only when the heaps' free bytes (glibc's ``mallinfo2``) exceed what they were
            right after the last trim by more than this. A trimmed chunk stays free in that count
            (only its pages went back), so between trims RSS holds at most the free bytes of the
            last trim plus ``slack`` beyond what is in use, whatever the depth; heaps that merely
            reuse their free chunks block after block are not trimmed again. Trimming after each of
            the 60 block sessions of a streamed SmolLM2 step cost 9% of the step on a 2-core CPU
            (150,000 page faults), once the reads stopped faulting (``modelio.host_buffers``).
    """
    libc = _glibc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return
    if slack and free_heap_bytes() < _FREE_AFTER_LAST_TRIM["bytes"] + slack:
        return
    libc.malloc_trim(0)
    _FREE_AFTER_LAST_TRIM["bytes"] = free_heap_bytes() if slack else 0


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
