"""The model folder a job writes, one way for every command (``run``, ``retrain``, ``shrink``).

One safetensors shard per block (``shard_name``) and one, the last, for the tensors outside the
blocks, each written atomically when it is ready (``ModelFolderWriter.write_block`` / ``write_rest``).
Then ``ModelFolderWriter.finish``: the tokenizer and generation files, ``config.json`` (the input's with
the bias flags a repair needed switched on, ``config_with_bias_flags``, or a shrunk model's sizes), the
job's own files that belong with the model (``shrink.json``) and, last, the index, built from the
shards' headers: the file that makes the folder a loadable model, so a folder without it is visibly
unfinished. Nothing here knows about jobs' records (``reconstruct.state``); callers record what it wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

from reconstruct.atomic import atomic_copy_file, atomic_write_bytes, atomic_write_json, save_safetensors_atomic
from reconstruct.modelio.folder_layout import CONFIG_NAME, INDEX_NAME, JOB_FILES, REPORT_NAME, STATE_DIR
from reconstruct.modelio.safetensors_header import read_safetensors_header

__all__ = ["CONFIG_NAME", "INDEX_NAME", "REPORT_NAME", "STATE_DIR", "WEIGHT_SUFFIXES", "ModelFolderWriter",
           "config_with_bias_flags", "copy_side_files", "index_from_headers", "shard_name", "write_index"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
SKIPPED_FILES = {CONFIG_NAME, INDEX_NAME, "pytorch_model.bin.index.json"}  # written anew by every job
SHARD_METADATA = {"format": "pt"}  # what transformers expects in a safetensors shard's header


def shard_name(index: int, n_shards: int) -> str:
    """HF-style shard file name; shard ``n_shards - 1`` holds the tensors outside the blocks."""
    return f"model-{index + 1:05d}-of-{n_shards:05d}.safetensors"


def copy_side_files(source: Path, out: Path) -> None:
    """Copy tokenizer and generation files, each atomically (temp file, fsync, rename).

    Left out: weights, index and config (written anew), an earlier job's own files (``JOB_FILES``) and
    hidden files (locks, state, temp files).
    """
    for path in sorted(source.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.suffix not in WEIGHT_SUFFIXES \
                and path.name not in SKIPPED_FILES | JOB_FILES:
            atomic_copy_file(path, out / path.name)


def config_with_bias_flags(source: Path, bias_flags: dict[str, tuple[str, ...]], added: set[str]) -> dict:
    """``source``'s ``config.json`` with the flags switched on that give the linears in ``added`` a bias.

    Args:
        source: the input model folder.
        bias_flags: config flag → the linears it gives a bias (``ModelLayout.bias_flags``).
        added: the linears a repair gave a new bias (block-relative names).
    """
    config = json.loads((source / CONFIG_NAME).read_text())
    config.update({flag: True for flag, names in bias_flags.items() if added & set(names)})
    return config


def index_from_headers(out: Path, files: list[str]) -> tuple[dict[str, str], int]:
    """``(tensor name → shard file, total tensor bytes)`` of the shards ``files`` in ``out``, from their headers."""
    weight_map: dict[str, str] = {}
    total_bytes = 0
    for name in files:
        for key, entry in read_safetensors_header(out / name).items():
            weight_map[key] = name
            start, end = entry["data_offsets"]
            total_bytes += end - start
    return weight_map, total_bytes


def write_index(out: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    """Write ``model.safetensors.index.json``: the file that makes the folder a loadable model."""
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_bytes(out / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())


class ModelFolderWriter:
    """Writes one model folder: a shard per block, the shard of the rest, then side files, config, index last.

    Args:
        out: the folder (it exists).
        n_blocks: the model's blocks; the folder has ``n_blocks + 1`` shards.
    """

    def __init__(self, out: Path, n_blocks: int):
        self.out = Path(out)
        self.n_shards = n_blocks + 1

    def block_file(self, index: int) -> str:
        """The shard of block ``index``."""
        return shard_name(index, self.n_shards)

    @property
    def rest_file(self) -> str:
        """The shard of the tensors outside the blocks (embeddings, final norm, head)."""
        return shard_name(self.n_shards - 1, self.n_shards)

    @property
    def shard_files(self) -> list[str]:
        """Every shard, blocks first."""
        return [shard_name(index, self.n_shards) for index in range(self.n_shards)]

    def write_block(self, index: int, tensors: dict) -> str:
        """Write block ``index``'s shard atomically; returns its sha256."""
        return save_safetensors_atomic(self.out / self.block_file(index), tensors, SHARD_METADATA)

    def write_rest(self, tensors: dict) -> str:
        """Write the shard of the tensors outside the blocks atomically; returns its sha256."""
        return save_safetensors_atomic(self.out / self.rest_file, tensors, SHARD_METADATA)

    def weight_map(self) -> tuple[dict[str, str], int]:
        """``(tensor name → shard, total tensor bytes)`` of the shards written, from their headers."""
        return index_from_headers(self.out, self.shard_files)

    def finish(self, source: Path, config: dict, job_files: dict[str, dict] | None = None) -> list[str]:
        """Complete the folder once every shard is written; the index last makes it loadable.

        Args:
            source: the input model folder (its tokenizer and generation files are copied).
            config: the content of ``config.json``.
            job_files: JSON files of the job that belong with the model (``shrink.json``), by name.

        Returns:
            The files written besides the side files: config, job files, index.
        """
        copy_side_files(source, self.out)
        atomic_write_json(self.out / CONFIG_NAME, config)
        for name, content in (job_files or {}).items():
            atomic_write_json(self.out / name, content)
        write_index(self.out, *self.weight_map())
        return [CONFIG_NAME, *(job_files or {}), INDEX_NAME]
