"""Shrink structured pruning into a smaller architecture (``reconstruct shrink``, ``run --shrink``).

A folder whose heads or MLP channels were pruned holds zeroed matrices of the original shape. This
package deletes them: smaller dense matrices and a ``config.json`` whose sizes match, which stock
``AutoModelForCausalLM.from_pretrained`` loads and which computes the same function.

Modules, one job each: ``roles`` (which linears hold heads and channels: ``pruners.structured``'s
discovery), ``removed`` (which groups each block removed, and whether a config can express the
rest), ``families`` (the per-``model_type`` config keys), ``slicing`` (the tensor surgery), ``writer``
(the atomic, resumable output folder). Memory: one block's tensors at a time.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from reconstruct.state.lock import JobLock
from reconstruct.modelio.loaded import load_model
from reconstruct.modelio.safetensors_header import read_safetensors_header
from reconstruct.shrink.families import check_shrinkable, shrunk_config
from reconstruct.shrink.removed import ShrinkPlan, find_removed
from reconstruct.shrink.roles import BlockRoles, find_roles
from reconstruct.shrink.slicing import shrink_block_tensors
from reconstruct.shrink.writer import (
    STATE_NAME, SUMMARY_NAME, ShrinkState, clean_leftovers, copy_side_files, finish_folder, shard_name,
    source_identity, write_shard, write_small_file,
)

logger = logging.getLogger(__name__)

SHRUNK_DIR = "shrunk"  # run --shrink: the smaller model goes to OUT/shrunk (OUT keeps the job and its resume state)

__all__ = ["SHRUNK_DIR", "check_shrinkable", "count_parameters", "shrink_folder", "find_roles", "find_removed", "ShrinkPlan", "BlockRoles"]


def shard_entries(path: Path) -> dict[str, tuple[list[int], int]]:
    """Tensor name -> (shape, data bytes), from a safetensors file's header (no data read)."""
    return {name: (entry["shape"], entry["data_offsets"][1] - entry["data_offsets"][0])
            for name, entry in read_safetensors_header(path).items()}


def count_parameters(folder: Path) -> int:
    """Elements of every tensor stored in a folder's ``*.safetensors`` files (headers only)."""
    return sum(math.prod(shape) for path in sorted(folder.glob("*.safetensors"))
               for shape, _ in shard_entries(path).values())


def _check_paths(source: Path, out: Path) -> None:
    """Refuse a missing source, ``--out`` equal to it, or an ``--out`` holding something else."""
    if not source.is_dir() or not (source / "config.json").is_file():
        raise ValueError(f"shrink: {source} is not a model folder (no config.json)")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    if out.resolve() == source.resolve():
        raise ValueError(f"--out {out} is the folder being shrunk; give another folder")
    if out.is_dir() and any(out.iterdir()) and not (out / STATE_NAME).is_file():
        ShrinkState.open(out, {}, {})  # raises the "holds no shrunk model" refusal


def shrink_folder(source: Path, out: Path) -> dict:
    """Write the shrunk model of ``source`` into ``out`` (resuming an interrupted shrink there).

    Args:
        source: a model folder whose heads or channels are zeroed (a ``reconstruct run`` output, or
            any folder: then all-zero groups are found).
        out: the new folder.

    Returns:
        The content of ``out/shrink.json``: what was deleted, the kept sizes, parameters and bytes
        before and after.

    Raises:
        ValueError: before anything is written, with the reason (nothing to delete, uneven counts,
            a family or grouped-query layout its config cannot express, an ``--out`` in use).
    """
    source, out = Path(source).expanduser(), Path(out).expanduser()
    _check_paths(source, out)
    loaded = load_model(str(source), "cpu", "float32")
    roles = find_roles(loaded)
    plan = find_removed(loaded, roles)
    config = shrunk_config(json.loads((source / "config.json").read_text()), plan.sizes)
    with JobLock(out):
        clean_leftovers(out)
        state = ShrinkState.open(out, source_identity(source), plan.to_dict())
        if state.finished:
            logger.info("%s already holds this shrunk model; nothing to do", out)
            return json.loads((out / SUMMARY_NAME).read_text())
        weight_map = _write_shards(state, loaded, roles, plan)
        copy_side_files(source, out)
        write_small_file(state, "config.json", config)
        summary = _summary(source, plan, weight_map, out)
        write_small_file(state, SUMMARY_NAME, summary)
        finish_folder(state, {name: file for name, (file, _) in weight_map.items()},
                      sum(size for _, size in weight_map.values()))
    logger.info("wrote %s: %s parameters (was %s)", out, f"{summary['parameters']['after']:,}",
                f"{summary['parameters']['before']:,}")
    return summary


def _write_shards(state: ShrinkState, loaded, roles: BlockRoles, plan: ShrinkPlan) -> dict[str, tuple[str, int]]:
    """One shard per shrunk block, then the tensors outside the blocks; tensor -> (file, bytes)."""
    layout = loaded.layout
    n_shards = layout.n_blocks + 1
    model_keys = list(loaded.model.state_dict())
    for index in range(layout.n_blocks):
        prefix = layout.block_prefix(index)

        def block_tensors(prefix=prefix, index=index):
            stored = {key: loaded.reader.read(loaded.key_map[key]) for key in model_keys
                      if key.startswith(prefix) and key in loaded.key_map}
            return shrink_block_tensors(stored, prefix, roles, plan.removed[index])

        write_shard(state, shard_name(index, n_shards), block_tensors)
        loaded.reader.close()
    write_shard(state, shard_name(n_shards - 1, n_shards), loaded.read_outside_block_tensors)
    loaded.reader.close()
    weight_map: dict[str, tuple[str, int]] = {}
    for index in range(n_shards):
        name = shard_name(index, n_shards)
        weight_map.update({key: (name, size) for key, (_, size) in shard_entries(state.out / name).items()})
    return weight_map


def _summary(source: Path, plan: ShrinkPlan, weight_map: dict[str, tuple[str, int]], out: Path) -> dict:
    """``shrink.json``: the plan, and the parameters and weight-file bytes of the source and the shrunk folder."""
    files = sorted({file for file, _ in weight_map.values()})
    return {
        "source": str(source),
        **plan.to_dict(),
        "parameters": {"before": count_parameters(source), "after": count_parameters(out)},
        "file_bytes": {"before": sum(path.stat().st_size for path in source.glob("*.safetensors")),
                       "after": sum((out / file).stat().st_size for file in files)},
    }
