"""Cheap identities of a model folder and of calibration text, for the resume check.

Hashing 60 GB of shards at every resume would take minutes, so weight shards are identified by what
changes when the model changes, read in a few MiB per shard:

- ``*.safetensors``: size, sha256 of the header (8-byte length + JSON: names, dtypes, shapes,
  offsets, metadata), and sha256 of the first and last MiB of the tensor data (catches a base vs
  fine-tuned checkpoint with identical shapes).
- ``*.bin`` / ``*.pt`` / ``*.pth`` / ``*.gguf``: size and sha256 of the first and last MiB.
- Small files that shape the result (``*.json`` configs and indexes, tokenizer files, remote
  ``*.py`` code): sha256 of the whole file.

``README.md``, licences and hidden files are ignored.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from reconstruct.atomic import sha256_file

SAMPLE_BYTES = 1 << 20  # bytes hashed at each end of a large file
WHOLE_FILE_SUFFIXES = (".json", ".model", ".tiktoken", ".txt", ".py")
WHOLE_FILE_LIMIT = 256 << 20  # larger "small" files are sampled like shards
SHARD_SUFFIXES = (".bin", ".pt", ".pth", ".gguf")
SAFETENSORS_HEADER_LIMIT = 100_000_000  # the safetensors library's own limit


def _ends_digest(path: Path, start: int, end: int) -> str:
    """sha256 of bytes [start, start+1 MiB) and [end-1 MiB, end) of a file (overlap-free)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if end - start <= 2 * SAMPLE_BYTES:
            handle.seek(start)
            digest.update(handle.read(end - start))
        else:
            handle.seek(start)
            digest.update(handle.read(SAMPLE_BYTES))
            handle.seek(end - SAMPLE_BYTES)
            digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()


def _safetensors_identity(path: Path, size: int) -> str:
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < length <= SAFETENSORS_HEADER_LIMIT or 8 + length > size:
            return f"size={size} invalid-header ends={_ends_digest(path, 0, size)}"
        header = hashlib.sha256(prefix + handle.read(length)).hexdigest()
    return f"size={size} header={header} data-ends={_ends_digest(path, 8 + length, size)}"


def file_identity(path: Path) -> str | None:
    """Identity string of one model file, or ``None`` if the file does not shape the result.

    Args:
        path: A file in a model folder.

    Returns:
        ``"size=N ..."`` with the hashes described in the module docstring, or ``None``.
    """
    name = path.name
    if name.startswith(".") or not path.is_file():
        return None
    size = path.stat().st_size
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _safetensors_identity(path, size)
    if suffix in SHARD_SUFFIXES or (suffix in WHOLE_FILE_SUFFIXES and size > WHOLE_FILE_LIMIT):
        return f"size={size} ends={_ends_digest(path, 0, size)}"
    if suffix in WHOLE_FILE_SUFFIXES:
        return f"size={size} sha256={sha256_file(path)}"
    return None


def fingerprint_model_files(model_dir: Path) -> dict[str, str]:
    """Identify the files of a model folder cheaply (a few MiB read per shard).

    Args:
        model_dir: The resolved model folder (top level only, as Hugging Face lays it out), or a
            single model file such as a ``.gguf``.

    Returns:
        File name → identity string, sorted by name. Equal for an unchanged folder; different when
        a config, index, tokenizer file or shard (header, size or ends) changes.

    Raises:
        ValueError: if ``model_dir`` does not exist.
    """
    model_dir = Path(model_dir)
    if model_dir.is_file():
        files = [model_dir]
    elif model_dir.is_dir():
        files = sorted(model_dir.iterdir(), key=lambda p: p.name)
    else:
        raise ValueError(f"--model {model_dir}: no such file or folder")
    result: dict[str, str] = {}
    for path in files:
        identity = file_identity(path)
        if identity is not None:
            result[path.name] = identity
    return result


def hash_text_source(path_or_bytes: str | os.PathLike | bytes | bytearray | memoryview) -> str:
    """sha256 of calibration data, streamed.

    Args:
        path_or_bytes: The raw bytes, a file (hashed as its bytes), or a folder (every file below
            it, in sorted relative-path order, each framed by its path and size, so renames and
            moves count).

    Returns:
        The sha256 hex digest.

    Raises:
        ValueError: if the path does not exist.
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return hashlib.sha256(path_or_bytes).hexdigest()
    path = Path(path_or_bytes)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise ValueError(f"calibration source {path}: no such file or folder")
    digest = hashlib.sha256()
    files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
    for item in files:
        rel = item.relative_to(path).as_posix().encode("utf-8")
        digest.update(struct.pack("<Q", len(rel)) + rel + struct.pack("<Q", item.stat().st_size))
        with open(item, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()
