"""Shrink structured pruning into a smaller architecture (``reconstruct shrink``, ``run --shrink``).

A folder whose heads or MLP channels were pruned holds zeroed matrices of the original shape. This
package deletes them: smaller dense matrices and a ``config.json`` whose sizes match, which stock
``AutoModelForCausalLM.from_pretrained`` loads and which computes the same function.

Modules, one job each: ``roles`` (which linears hold heads and channels: ``pruners.structured``'s
discovery), ``removed`` (which groups each block removed, and whether a config can express the
rest), ``families`` (the per-``model_type`` config keys), ``slicing`` (the tensor surgery). Memory: one
block's tensors at a time.

The output folder is written atomically and resumably, as every command's: the model by
``modelio.output.ModelFolderWriter`` (one shard per block, the rest, ``config.json`` with the kept sizes,
tokenizer and generation files, ``shrink.json``, the index last), the job by ``state.job_folder``
(lock, the refusal of an ``--out`` holding anything else, ``.shrink-state.json``: the source's identity,
the plan and the sha256 of each finished file). A rerun after a kill re-verifies the finished shards and
writes only what is missing; a rerun after the end does nothing.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from reconstruct.atomic import sha256_file
from reconstruct.modelio.folder_layout import CONFIG_NAME, INDEX_NAME, SHRINK_SUMMARY_NAME as SUMMARY_NAME
from reconstruct.modelio.loaded import LoadedModel, load_model
from reconstruct.modelio.output import WEIGHT_SUFFIXES, ModelFolderWriter
from reconstruct.modelio.safetensors_header import read_safetensors_header
from reconstruct.shrink.families import check_shrinkable, shrunk_config
from reconstruct.shrink.removed import ShrinkPlan, find_removed
from reconstruct.shrink.roles import BlockRoles, find_roles
from reconstruct.shrink.slicing import shrink_block_tensors
from reconstruct.state.fingerprint import fingerprint_model_files
from reconstruct.state.job_folder import SHRINK_JOB, JobFolder, JobRecord

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


def source_identity(folder: Path) -> dict[str, str]:
    """The source's weights, config and index by whole-file sha256 (``state.fingerprint``); reports left out."""
    files = fingerprint_model_files(folder)
    return {name: ident for name, ident in files.items()
            if name.endswith(WEIGHT_SUFFIXES) or name in (CONFIG_NAME, INDEX_NAME)}


def _check_paths(source: Path, folder: JobFolder) -> None:
    """Refuse a missing source, ``--out`` equal to it, or an ``--out`` holding something else."""
    if not source.is_dir() or not (source / CONFIG_NAME).is_file():
        raise ValueError(f"shrink: {source} is not a model folder (no config.json)")
    if folder.out.resolve() == source.resolve():
        raise ValueError(f"--out {folder.out} is the folder being shrunk; give another folder")
    folder.refuse_foreign()


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
    folder = JobFolder(out, SHRINK_JOB)
    _check_paths(source, folder)
    loaded = load_model(str(source), "cpu", "float32")
    roles = find_roles(loaded)
    plan = find_removed(loaded, roles)
    config = shrunk_config(json.loads((source / CONFIG_NAME).read_text()), plan.sizes)
    with folder.locked():
        record = _open_record(folder, {"source": source_identity(source), "plan": plan.to_dict()})
        if record.finished and folder.intact(record.files):
            logger.info("%s already holds this shrunk model; nothing to do", out)
            return json.loads((out / SUMMARY_NAME).read_text())
        writer = ModelFolderWriter(out, loaded.layout.n_blocks)
        _write_shards(folder, record, writer, loaded, roles, plan)
        summary = _summary(source, plan, writer)
        for name in writer.finish(source, config, {SUMMARY_NAME: summary}):  # the index last
            record.record_file(name, sha256_file(out / name))
        record.finish()
    logger.info("wrote %s: %s parameters (was %s)", out, f"{summary['parameters']['after']:,}",
                f"{summary['parameters']['before']:,}")
    return summary


# Labels of the fingerprint's fields for a resume's refusal: the folder shrunk and what it removes (no flag sets either).
SHRINK_FINGERPRINT_FLAGS: dict[str, str] = {
    "source": "the model folder (its file {rest})",
    "plan": "the heads and channels removed",
}


def _open_record(folder: JobFolder, fingerprint: dict) -> JobRecord:
    """The record of this shrink in ``--out``, or a new one; refuses the shrink of another folder or plan."""
    record = folder.read_record()
    if record is not None:
        folder.check_same_job(record.fingerprint, fingerprint, SHRINK_FINGERPRINT_FLAGS)
        return record
    folder.refuse_foreign()  # again, under the lock
    return folder.new_record(fingerprint)


def _write_shards(folder: JobFolder, record: JobRecord, writer: ModelFolderWriter, loaded: LoadedModel,
                  roles: BlockRoles, plan: ShrinkPlan) -> None:
    """One shard per shrunk block, then the tensors outside the blocks; each unless an earlier run finished it."""
    layout = loaded.layout
    model_keys = list(loaded.model.state_dict())

    def write(name: str, write_shard) -> None:
        if folder.file_intact(name, record.files.get(name)):
            logger.info("%s: already written", name)
            return
        record.record_file(name, write_shard())
        loaded.reader.close()

    for index in range(layout.n_blocks):
        prefix = layout.block_prefix(index)

        def block_shard(prefix=prefix, index=index) -> str:
            stored = {key: loaded.reader.read(loaded.key_map[key]) for key in model_keys
                      if key.startswith(prefix) and key in loaded.key_map}
            return writer.write_block(index, shrink_block_tensors(stored, prefix, roles, plan.removed[index]))

        write(writer.block_file(index), block_shard)
    write(writer.rest_file, lambda: writer.write_rest(loaded.read_outside_block_tensors()))


def _summary(source: Path, plan: ShrinkPlan, writer: ModelFolderWriter) -> dict:
    """``shrink.json``: the plan, and the parameters and weight-file bytes of the source and the shrunk folder."""
    weight_map, _ = writer.weight_map()
    files = sorted(set(weight_map.values()))
    return {
        "source": str(source),
        **plan.to_dict(),
        "parameters": {"before": count_parameters(source), "after": count_parameters(writer.out)},
        "file_bytes": {"before": sum(path.stat().st_size for path in source.glob("*.safetensors")),
                       "after": sum((writer.out / file).stat().st_size for file in files)},
    }
