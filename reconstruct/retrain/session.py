"""Loading one block for retraining: materialise, attach its trainables, call the hook, release.

Shared by the streamed step, the resident model and the final merge, so every path sees a block the
same way. With ``reads`` (a background ``BlockReads``), the caller names the block it loads next
(``then``) and its tensors are read in a worker thread while this one computes; the time counted for
the report is then what the caller waited for a read and the install, else the whole read.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from reconstruct.host_allocator import release_free_heap
from reconstruct.methods.attach import MethodHandle
from reconstruct.modelio.block_io import install_module_tensors, load_module_weights, release_module_weights
from reconstruct.modelio.block_reads import BlockReads
from reconstruct.modelio.loaded import LoadedModel
from reconstruct.retrain.hooks import NoHooks, RetrainHooks
from reconstruct.retrain.trainables import ModelTrainables


FREE_HEAP_SLACK = 64 << 20  # free heap bytes left between block sessions (the next block reuses them)


@dataclass
class BlockLoader:
    """Loads blocks of ``loaded`` with ``trainables`` attached, calling ``hooks.block_loaded``."""

    loaded: LoadedModel
    trainables: ModelTrainables
    hooks: RetrainHooks = field(default_factory=NoHooks)
    read_seconds: float = 0.0  # wall time spent materialising block weights (waiting for them, with reads)
    reads: BlockReads | None = None  # reads the next block in the background (None: read when loading)

    def load(self, index: int, then: int | None = None) -> tuple[nn.Module, dict[str, torch.dtype], MethodHandle]:
        """Materialise block ``index`` and attach its trainables; returns (block, stored dtypes, handle).

        ``then``: the block the caller loads next (another one), read meanwhile when there are ``reads``.
        """
        loaded = self.loaded
        block = loaded.blocks[index]
        started = time.perf_counter()
        if self.reads is None:
            stored = load_module_weights(block, loaded.layout.block_prefix(index), loaded.reader, loaded.key_map,
                                         loaded.device, loaded.dtype)
            loaded.reader.close()  # unmap the shards: pages of earlier blocks must not stay resident
        else:
            read, _ = self.reads.take(index)
            stored = install_module_tensors(block, read.tensors, loaded.device, loaded.dtype, owned=True)
            self.read_ahead(then)
        self.read_seconds += time.perf_counter() - started
        handle = self.trainables.attach(index, block)
        self.hooks.block_loaded(index, block)
        return block, stored, handle

    def read_ahead(self, index: int | None) -> None:
        """Start reading block ``index`` in the background (nothing without ``reads``, or for None).

        The block must not be loaded now: the reader walks its module tree, which attaching changes.
        """
        if self.reads is not None and index is not None:
            self.reads.prefetch(index)

    @contextmanager
    def session(self, index: int, then: int | None = None):
        """Block ``index`` loaded with its trainables for the ``with`` body; discarded and released after.

        ``then``: the block loaded next, read meanwhile (when it is ``index`` itself, once it is released).
        """
        block, _, handle = self.load(index, None if then == index else then)
        try:
            yield block
        finally:
            handle.discard()
            release_module_weights(block)
            release_free_heap(FREE_HEAP_SLACK)  # free heap pages of block sessions must not pile up in RSS
            if then == index:
                self.read_ahead(then)
