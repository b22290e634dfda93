"""Identities of a model folder and of calibration text, for the resume check.

Every file that shapes the result (weight shards ``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``,
``*.gguf``; ``*.json`` configs and indexes, tokenizer files, remote ``*.py`` code) is identified by
its size and the sha256 of its whole content, so an edit anywhere in a shard changes the job's
fingerprint. Reading 60 GB at every resume would take minutes, so the hashes are remembered in a
:class:`HashCache` (``--out/.reconstruct/file-hashes.json``) keyed by the file's path, size,
``mtime_ns``, ``ctime_ns`` and inode: the model is read once per job, and a resume re-reads only a
file whose stat changed. The trade-off: a change that keeps size, both timestamps and inode (bytes
rewritten by a tool that then restores the times within the clock's resolution, or silent disk
corruption) goes unnoticed; ``ctime`` cannot be set back from user space, so ordinary edits,
copies and ``touch`` are all caught.

``README.md``, licences and hidden files are ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from calib.text_sources import SELF
from reconstruct.atomic import atomic_write_json, sha256_file
from reconstruct.progress import progress_bar

logger = logging.getLogger(__name__)

SHAPING_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model", ".tiktoken", ".txt", ".py")
HASH_WORKERS = 4  # files hashed in parallel (hashlib releases the GIL)


def file_stat(path: Path) -> dict[str, int]:
    """What changes when a file's content is rewritten: size, mtime_ns, ctime_ns, inode."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


class HashCache:
    """Whole-file sha256 digests remembered by :func:`file_stat`; a file is read again only when it changes.

    Args:
        path: The JSON file the cache is kept in (``None``: in memory only). A missing or damaged
            file is an empty cache.
    """

    def __init__(self, path: Path | None = None):
        self.path = path
        self.entries: dict[str, dict] = {}
        self.changed = False
        if path is not None and path.is_file():
            try:
                loaded = json.loads(path.read_text())
                self.entries = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                logger.warning("%s is damaged; hashing the model files again", path)

    def sha256(self, path: Path) -> str:
        """sha256 of ``path``'s bytes: from the cache when its stat is unchanged, else read and remembered."""
        key = str(Path(path).resolve())
        stat = file_stat(path)
        entry = self.entries.get(key)
        if isinstance(entry, dict) and entry.get("stat") == stat and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
        digest = sha256_file(path)
        if file_stat(path) == stat:  # not remembered if the file changed while it was read
            self.entries[key] = {"stat": stat, "sha256": digest}
            self.changed = True
        return digest

    def save(self) -> None:
        """Write the cache (atomically) if it learned a digest; no-op for an in-memory cache."""
        if self.path is None or not self.changed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self.entries)
        self.changed = False


def shapes_result(path: Path) -> bool:
    """True for a model file that shapes the result (not hidden, not README/licence)."""
    return not path.name.startswith(".") and path.is_file() and path.suffix.lower() in SHAPING_SUFFIXES


def file_identity(path: Path, hashes: HashCache | None = None) -> str | None:
    """Identity string of one model file, or ``None`` if the file does not shape the result.

    Args:
        path: A file in a model folder.
        hashes: Where whole-file digests are remembered (default: none, the file is read).

    Returns:
        ``"size=N sha256=HEX"`` (the whole file), or ``None``.
    """
    if not shapes_result(path):
        return None
    digest = (hashes or HashCache()).sha256(path)
    return f"size={path.stat().st_size} sha256={digest}"


def fingerprint_model_files(model_dir: Path, hashes: HashCache | None = None) -> dict[str, str]:
    """Identify the files of a model folder by size and whole-file sha256.

    Args:
        model_dir: The resolved model folder (top level only, as Hugging Face lays it out), or a
            single model file such as a ``.gguf``.
        hashes: Remembered digests: only files whose stat changed since are read (default: read all).

    Returns:
        File name → identity string, sorted by name. Equal for an unchanged folder; different when
        any byte of a config, index, tokenizer file or shard changes.

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
    hashes = hashes or HashCache()
    with ThreadPoolExecutor(max_workers=HASH_WORKERS) as pool, \
            progress_bar(desc="hashing model files", unit="file", total=len(files), leave=False) as bar:
        identities = list(pool.map(lambda path: _counted(file_identity(path, hashes), bar), files))
    return {path.name: identity for path, identity in zip(files, identities) if identity is not None}


def _counted(value, bar):
    """``value``, after one step of ``bar`` (a file hashed, or found unchanged)."""
    bar.update()
    return value


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


def text_source_identity(source: str) -> dict:
    """What of a ``--calib``-style source decides its windows: a file's name and content hash, else its name.

    The one identity of a text in every fingerprint: ``--calib``, ``--recon-val-data``, ``--retrain-data``,
    ``retrain --data``. A dataset name or ``self`` is named as given.
    """
    path = Path(source).expanduser()
    if source != SELF and path.is_file():
        return {"file": path.name, "sha256": hash_text_source(path)}
    return {"name": source}
