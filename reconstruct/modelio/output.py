"""The output folder: one safetensors shard per block, the untouched tensors, index, config, tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from reconstruct.atomic import atomic_copy_file, atomic_write_bytes, atomic_write_json
from reconstruct.modelio.folder_layout import INDEX_NAME, JOB_FILES, REPORT_NAME, STATE_DIR

__all__ = ["INDEX_NAME", "REPORT_NAME", "STATE_DIR", "WEIGHT_SUFFIXES", "copy_side_files", "shard_name",
           "write_config", "write_index"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
SKIPPED_FILES = {"config.json", INDEX_NAME, "pytorch_model.bin.index.json"}  # written anew by every job


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


def write_config(source: Path, out: Path, enabled_flags: dict[str, bool]) -> None:
    """Copy ``config.json``, switching on the bias flags reconstruction needed."""
    config = json.loads((source / "config.json").read_text())
    config.update(enabled_flags)
    atomic_write_json(out / "config.json", config)


def write_index(out: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    """Write ``model.safetensors.index.json``: the file that makes the folder a loadable model."""
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_bytes(out / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())
