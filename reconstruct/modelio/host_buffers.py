"""Host buffers that one block's tensors are read into, reused block after block.

Every block read used to copy each tensor out of the shard's memory map into a fresh allocation. Both
sides cost page faults: the map's pages on first touch, and the new buffer's pages (host tensors of
1 MiB and more are served by their own ``mmap``, ``host_allocator``), which the kernel also zero-fills.
A streamed retraining step reads every block twice, so on a 2-core CPU SmolLM2's 60 reads a step made
about 360,000 minor faults and a second of system time. ``ReusableBuffers`` keeps a few flat byte
buffers: a block's tensors are read into one with plain file reads (no fault on the source side:
the kernel copies from its page cache) and handed out as views of it; once nothing holds a view any
more (the block was released and its shard written), the buffer takes the next block's bytes, its
pages already resident. The pool holds at most ``max_buffers`` buffers (a block computing, the next one
being read, one being written); a read that finds none free gets a fresh buffer, as before.
"""

from __future__ import annotations

import torch

ALIGN = 64  # bytes: every tensor starts on a cache line, so any dtype's view of the bytes is aligned


def _use_count(tensor: torch.Tensor):
    """How many tensors share ``tensor``'s storage (torch's own count), or None when torch cannot tell."""
    count = getattr(torch._C, "_storage_Use_Count", None)  # noqa: SLF001 (no public equivalent)
    if count is None:
        return None
    return count(tensor.untyped_storage()._cdata)  # noqa: SLF001


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to a multiple of ``ALIGN``."""
    return -(-nbytes // ALIGN) * ALIGN


class ReusableBuffers:
    """A few flat uint8 CPU buffers, each handed out again once no tensor views it.

    Args:
        max_buffers: buffers kept for reuse; more reads in flight get fresh, unpooled buffers.
    """

    def __init__(self, max_buffers: int = 3) -> None:
        self.max_buffers = max_buffers
        self._buffers: list[tuple[torch.Tensor, int]] = []  # (buffer, its storage's use count when idle)

    def take(self, nbytes: int) -> torch.Tensor:
        """A (nbytes,) uint8 view of a buffer whose storage nothing else uses; its contents are undefined."""
        for buffer, idle in self._buffers:
            if buffer.numel() >= nbytes and _use_count(buffer) == idle:
                return buffer[:nbytes]
        fresh = torch.empty(nbytes, dtype=torch.uint8)
        idle = _use_count(fresh)
        if idle is None:
            return fresh  # no way to tell when a buffer is free: never reuse one
        if len(self._buffers) < self.max_buffers:
            self._buffers.append((fresh, idle))
        else:  # replace a free buffer that was too small, if there is one
            for position, (buffer, idle_count) in enumerate(self._buffers):
                if _use_count(buffer) == idle_count:
                    self._buffers[position] = (fresh, idle)
                    break
        return fresh[:nbytes]  # a view, counted as a user (the pool's own tensor object would not be)

    def clear(self) -> None:
        """Drop the pool's references (buffers still viewed live on until their views go)."""
        self._buffers.clear()
