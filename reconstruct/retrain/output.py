"""Writing the retrained model: every block merged (or left as loaded), zeros checked bit for bit.

Each block is loaded, its trainables attached and merged, checked against the input checkpoint (every
weight that is exactly zero there is exactly zero in the tensor written), and written atomically as its
own shard; then the tensors outside the blocks (unchanged), side files, config and, last, the index
that makes the folder loadable: ``modelio.output.ModelFolderWriter``, the writer of every command.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pruners.layers import weight_as_out_in
from reconstruct.host_allocator import release_free_heap
from reconstruct.modelio.block_io import (
    keep_nonzero_when_stored,
    module_tensors_for_output,
    release_module_weights,
)
from reconstruct.modelio.output import ModelFolderWriter, config_with_bias_flags
from reconstruct.retrain.session import BlockLoader
from reconstruct.retrain.trainables import block_linears

logger = logging.getLogger(__name__)


def check_zeros_kept(written: dict[str, torch.Tensor], loader: BlockLoader, index: int) -> int:
    """Raise RuntimeError if a linear weight that is zero in the input is not zero in ``written``.

    Compares, bit for bit, the tensors about to be written with the input checkpoint's.

    Returns:
        The number of zeros checked.
    """
    loaded = loader.loaded
    prefix = loaded.layout.block_prefix(index)
    checked = 0
    for name in loaded.layout.linear_names:
        key = f"{prefix}{name}.weight"
        source = loaded.reader.read(loaded.key_map[key])  # stored layout, stored dtype
        zeros = source == 0
        revived = int((written[key][zeros] != 0).sum())
        if revived:
            raise RuntimeError(f"{key}: {revived} weight(s) that are zero in --model became non-zero; nothing was written")
        checked += int(zeros.sum())
    return checked


def write_block(loader: BlockLoader, index: int, out: Path, *, merge: bool, trained: bool,
                allow_dense_merge: bool) -> set[str]:
    """Merge block ``index``'s trainables (or not) and write its shard; returns the linears given a new bias.

    Args:
        loader: loads the block with its trainables (and calls ``block_loaded``).
        index: the block.
        out: the output folder.
        merge: fold the trainables in; False drops them (the hooks' in-place changes stay).
        trained: False writes the block exactly as loaded (the training did not pay off).
        allow_dense_merge: lora: accept refilled zeros (the zero check is skipped).
    """
    loaded = loader.loaded
    prefix = loaded.layout.block_prefix(index)
    block, stored, handle = loader.load(index, index + 1 if index + 1 < loaded.layout.n_blocks else None)
    added: set[str] = set()
    try:
        if merge and trained:
            handle.merge(allow_dense_merge=allow_dense_merge)
            added = set(handle.added_biases)
        else:
            handle.discard()
        for name, linear in block_linears(block, loaded.layout).items():
            weight = weight_as_out_in(linear)
            keep_nonzero_when_stored(weight.data, weight != 0, stored.get(f"{name}.weight", weight.dtype))
        tensors = module_tensors_for_output(block, prefix, stored)
    finally:
        release_module_weights(block)
    if not (merge and trained and handle.method == "lora"):
        check_zeros_kept(tensors, loader, index)
    ModelFolderWriter(out, loaded.layout.n_blocks).write_block(index, tensors)
    release_free_heap()
    return added


def write_rest(loader: BlockLoader, out: Path, added_biases: set[str]) -> None:
    """Tensors outside the blocks (unchanged), side files, config (bias flags) and, last, the index."""
    loaded = loader.loaded
    writer = ModelFolderWriter(out, loaded.layout.n_blocks)
    writer.write_rest(loaded.read_outside_block_tensors())
    writer.finish(loaded.folder, config_with_bias_flags(loaded.folder, loaded.layout.bias_flags, added_biases))
