"""Loading one block for retraining: materialise, attach its trainables, call the hook, release.

Shared by the streamed step, the resident model and the final merge, so every path sees a block the
same way. Time spent reading weights is counted for the report.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from reconstruct.host_allocator import release_free_heap
from reconstruct.methods.attach import MethodHandle
from reconstruct.modelio.block_io import load_module_weights, release_module_weights
from reconstruct.modelio.loaded import LoadedModel
from reconstruct.retrain.hooks import NoHooks, RetrainHooks
from reconstruct.retrain.trainables import ModelTrainables


@dataclass
class BlockLoader:
    """Loads blocks of ``loaded`` with ``trainables`` attached, calling ``hooks.block_loaded``."""

    loaded: LoadedModel
    trainables: ModelTrainables
    hooks: RetrainHooks = field(default_factory=NoHooks)
    read_seconds: float = 0.0  # wall time spent materialising block weights

    def load(self, index: int) -> tuple[nn.Module, dict[str, torch.dtype], MethodHandle]:
        """Materialise block ``index`` and attach its trainables; returns (block, stored dtypes, handle)."""
        loaded = self.loaded
        block = loaded.blocks[index]
        started = time.perf_counter()
        stored = load_module_weights(block, loaded.layout.block_prefix(index), loaded.reader, loaded.key_map,
                                     loaded.device, loaded.dtype)
        loaded.reader.close()  # unmap the shards: pages of earlier blocks must not stay resident
        self.read_seconds += time.perf_counter() - started
        handle = self.trainables.attach(index, block)
        self.hooks.block_loaded(index, block)
        return block, stored, handle

    @contextmanager
    def session(self, index: int):
        """Block ``index`` loaded with its trainables for the ``with`` body; discarded and released after."""
        block, _, handle = self.load(index)
        try:
            yield block
        finally:
            handle.discard()
            release_module_weights(block)
            release_free_heap()  # free heap pages of this block's session must not stay resident
