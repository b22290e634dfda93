"""Reading blocks' tensors ahead, in a worker thread, while another block computes.

The block loop (``reconstruct.loop``) and model-level retraining's streamed path (``reconstruct.retrain``)
both read block i+1 while block i computes: :class:`BlockReads` reads a block's tensors
(``block_io.read_module_tensors``) in one worker thread with its own ``CheckpointReader``: into a
reused host buffer by plain file reads (``host_buffers``), or, for a GPU, copied out of the shards'
memory map into pinned memory, the reader closed after every block so the mapped pages of earlier
blocks do not stay resident; the caller installs them (``block_io.install_module_tensors``) when it
takes the block. File reads and tensor copies release the GIL, so the read runs beside the compute. With
``background=False`` the same reads happen in the caller's thread when it asks (the serial order).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from reconstruct.modelio.block_io import read_module_tensors
from reconstruct.modelio.checkpoint import CheckpointReader
from reconstruct.modelio.host_buffers import ReusableBuffers
from reconstruct.modelio.loaded import LoadedModel


@dataclass
class ReadBlock:
    """One block's tensors as read from the checkpoint (CPU, stored dtypes)."""

    index: int
    tensors: dict[str, torch.Tensor]  # local name → tensor (private copies, not views of a shard's map)
    read_seconds: float  # how long the read took, wherever it ran


class BlockReads:
    """Hands the loop each block's tensors; with ``background``, reads the next one ahead.

    Args:
        loaded: the model being streamed.
        background: read in a worker thread (one block ahead); else read when asked, in the
            caller's thread, through ``loaded.reader``, closed after every block (the serial order).
    """

    def __init__(self, loaded: LoadedModel, background: bool) -> None:
        self.loaded = loaded
        self.background = background
        self.pin = background and loaded.device.type == "cuda"
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="block-read") if background else None
        self._reader = CheckpointReader(loaded.folder) if background else None
        self._pending: dict[int, Future] = {}
        # pinned reads keep their own copies: a reused page-locked buffer could still feed an asynchronous copy
        self._buffers = None if self.pin else ReusableBuffers()

    def _read(self, index: int, reader: CheckpointReader) -> ReadBlock:
        started = time.perf_counter()
        loaded = self.loaded
        # Private copies in both orders: the pages are read here, so the read is timed where it happens
        # (a view of the memory map would be read by page faults later, inside the compute), and the
        # shards can be unmapped at once. Installing an owned tensor moves it without a second copy.
        tensors = read_module_tensors(loaded.blocks[index], loaded.layout.block_prefix(index), reader,
                                      loaded.key_map, own=True, pin=self.pin, buffers=self._buffers)
        reader.close()  # unmap the shards: mapped pages of earlier blocks must not stay resident
        return ReadBlock(index, tensors, time.perf_counter() - started)

    def prefetch(self, index: int) -> None:
        """Start reading block ``index`` in the background (no-op when serial or out of range)."""
        if self._pool is None or index >= self.loaded.layout.n_blocks or index in self._pending:
            return
        self._pending[index] = self._pool.submit(self._read, index, self._reader)

    def take(self, index: int) -> tuple[ReadBlock, float]:
        """Block ``index``'s tensors and the seconds the caller waited for them."""
        started = time.perf_counter()
        if self._pool is None:
            block = self._read(index, self.loaded.reader)
        else:
            self.prefetch(index)
            block = self._pending.pop(index).result()
        return block, time.perf_counter() - started

    def close(self) -> None:
        """Stop the worker (a read in progress finishes; one not started is dropped) and unmap the shards."""
        if self._pool is not None:
            for future in self._pending.values():
                future.cancel()
            self._pool.shutdown(wait=True)
            self._pending.clear()
            self._reader.close()

    def __enter__(self) -> BlockReads:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
