"""Crash-safe file writes: temp file in the same folder, write, fsync, rename, fsync the folder.

A reader (or a resumed run) sees either the old file or the complete new one, never a torn write.
Any ``OSError`` on the way (disk full, permissions, read-only file system) removes the temp file,
leaves the destination untouched and surfaces as one :class:`DiskWriteError` line that names the
path and the fix.

Temp files are named ``.<name>.<pid>.<random>.reconstruct-tmp``; a run killed with ``kill -9`` can
leave one behind, and :func:`remove_stale_temp_files` clears them when the next run starts.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import secrets
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    import torch
    from torch import Tensor

from reconstruct.faults import crash_point

logger = logging.getLogger(__name__)

TEMP_SUFFIX = ".reconstruct-tmp"


@functools.cache
def _safetensors_dtypes() -> dict[torch.dtype, tuple[str, int]]:
    """torch dtype → (safetensors name, rank). Built lazily so importing this module stays light.

    Ranks follow the safetensors library's dtype order, by which it places tensors in a file
    (highest rank first, then by name), so our bytes equal ``safetensors.torch.save``'s.
    """
    import torch

    table = {
        torch.bool: ("BOOL", 0),
        torch.uint8: ("U8", 1),
        torch.int8: ("I8", 2),
        torch.float8_e5m2: ("F8_E5M2", 3),
        torch.float8_e4m3fn: ("F8_E4M3", 4),
        torch.int16: ("I16", 5),
        torch.float16: ("F16", 7),
        torch.bfloat16: ("BF16", 8),
        torch.int32: ("I32", 9),
        torch.float32: ("F32", 11),
        torch.complex64: ("C64", 12),
        torch.float64: ("F64", 13),
        torch.int64: ("I64", 14),
    }
    for name, code, rank in (("uint16", "U16", 6), ("uint32", "U32", 10), ("uint64", "U64", 15)):
        if hasattr(torch, name):  # torch >= 2.3
            table[getattr(torch, name)] = (code, rank)
    return table


class DiskWriteError(ValueError):
    """A file could not be written; the destination is unchanged and no temp file is left.

    Attributes:
        path: The destination that could not be written.
        errno: The ``errno`` of the underlying ``OSError`` (``None`` if unknown).
    """

    def __init__(self, message: str, path: Path, error_number: int | None = None):
        super().__init__(message)
        self.path = path
        self.errno = error_number

    @classmethod
    def from_oserror(cls, path: Path, exc: OSError) -> DiskWriteError:
        """Build the one-line, actionable message for ``exc`` raised while writing ``path``."""
        folder = path.parent
        code = exc.errno
        if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            msg = f"no space left to write {path}: free space on {folder} or choose another --out"
        elif code in (errno.EACCES, errno.EPERM):
            msg = f"permission denied writing {path}: make {folder} writable or choose another --out"
        elif code == errno.EROFS:
            msg = f"cannot write {path}: {folder} is on a read-only file system; choose another --out"
        elif code == errno.ENOENT:
            msg = f"cannot write {path}: folder {folder} does not exist; create it or choose another --out"
        else:
            reason = exc.strerror or str(exc) or type(exc).__name__
            msg = f"cannot write {path} ({reason}): check {folder} or choose another --out"
        return cls(msg, path, code)


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:  # pragma: no cover - nothing more we can do
        logger.warning("could not remove temp file %s: %s", path, exc)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable. No-op where folders cannot be opened (Windows)."""
    if os.name == "nt":  # pragma: no cover
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some file systems (certain network / FUSE mounts) do not support fsync on a folder.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make renames and links in ``folder`` durable (the public name of the helper the atomic writes use)."""
    _fsync_dir(folder)


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


@contextmanager
def _atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Yield a binary file whose content replaces ``path`` atomically when the block exits cleanly.

    Raises:
        DiskWriteError: on any ``OSError`` while writing; ``path`` is untouched, the temp file removed.
    """
    path = Path(path)
    tmp = _temp_path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(tmp, flags, 0o666)  # 0o666 & ~umask: the same mode a plain open() would give
    except OSError as exc:
        raise DiskWriteError.from_oserror(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        crash_point(f"write:{path.name}")  # resume tests: die with the temp file written, not renamed
        os.replace(tmp, path)
    except OSError as exc:
        _remove_quietly(tmp)
        raise DiskWriteError.from_oserror(path, exc) from exc
    except BaseException:
        _remove_quietly(tmp)
        raise
    # The new content is in place; only the durability of the rename is left to secure.
    try:
        _fsync_dir(path.parent)
    except OSError as exc:
        raise DiskWriteError.from_oserror(path, exc) from exc


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably.

    Args:
        path: Destination file; its folder must exist.
        data: The complete new content.

    Raises:
        DiskWriteError: if the write fails; ``path`` keeps its old content (or stays absent).
    """
    with _atomic_file(Path(path)) as handle:
        handle.write(data)


def atomic_copy_file(source: Path, path: Path, chunk: int = 1 << 20) -> None:
    """Copy ``source`` to ``path`` atomically and durably, streaming ``chunk`` bytes at a time.

    Raises:
        DiskWriteError: if the write fails; ``path`` keeps its old content (or stays absent).
        OSError: if ``source`` cannot be read (nothing is written).
    """
    with open(source, "rb") as reader, _atomic_file(Path(path)) as handle:
        while block := reader.read(chunk):
            handle.write(block)


def atomic_write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON (sorted keys, indent 2, trailing newline) atomically.

    Args:
        path: Destination file.
        obj: A JSON-serialisable object.

    Raises:
        TypeError: if ``obj`` is not JSON-serialisable (nothing is written).
        DiskWriteError: if the write fails.
    """
    text = json.dumps(obj, sort_keys=True, indent=2) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def _tensor_bytes(tensor: Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, on CPU, in C order."""
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def safetensors_header(tensors: dict[str, Tensor], metadata: dict[str, str] | None) -> tuple[bytes, list[str]]:
    """Build a deterministic safetensors header and the order in which tensor data follows it.

    Tensors are ordered as the safetensors library orders them (dtype rank, then name); unlike the
    library, ``__metadata__`` keys are sorted, so equal inputs always give equal bytes.

    Args:
        tensors: Name → tensor.
        metadata: String → string metadata, or ``None``.

    Returns:
        The header bytes (8-byte little-endian length + JSON padded with spaces to a multiple of 8)
        and the tensor names in file order.
    """
    dtypes = _safetensors_dtypes()
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"invalid safetensors tensor name {name!r}")
        if tensor.dtype not in dtypes:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} cannot be stored in safetensors")
    order = sorted(tensors, key=lambda n: (-dtypes[tensors[n].dtype][1], n))
    header: dict[str, object] = {}
    if metadata is not None:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"safetensors metadata must map str to str, got {key!r}: {value!r}")
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name in order:
        tensor = tensors[name]
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": dtypes[tensor.dtype][0],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order


def save_safetensors_atomic(
    path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> str:
    """Save tensors as a safetensors file, atomically, streaming one tensor at a time.

    The bytes depend only on the tensors' names, dtypes, shapes and values and on ``metadata``
    (keys sorted), so equal inputs give byte-identical files. Tensors may live on any device and be
    non-contiguous; each is copied to CPU on its own, so extra memory is one tensor, not the dict.
    Tied (shared-storage) tensors are simply written twice.

    Args:
        path: Destination ``.safetensors`` file.
        tensors: Name → tensor.
        metadata: Header metadata. ``None`` means ``{"format": "pt"}``; a ``"format": "pt"`` entry is
            added when missing, since transformers refuses safetensors files without it.

    Returns:
        The sha256 hex digest of the complete file as written.

    Raises:
        DiskWriteError: if the write fails; ``path`` is untouched.
    """
    metadata = {"format": "pt", **(metadata or {})}
    header, order = safetensors_header(tensors, metadata)
    digest = hashlib.sha256(header)
    with _atomic_file(Path(path)) as handle:
        handle.write(header)
        for name in order:
            data = _tensor_bytes(tensors[name])
            digest.update(data)
            handle.write(data)
    return digest.hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Return the sha256 hex digest of a file, read in ``chunk``-byte pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete temp files that an interrupted atomic write left in ``folder``.

    Only files named by this module (``.*.reconstruct-tmp``) are touched. Call it while holding the
    folder's :class:`~reconstruct.state.lock.JobLock`, so no live writer's temp file is removed.

    Args:
        folder: The folder to clean (not recursive). A missing folder is fine.

    Returns:
        The paths removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for candidate in sorted(folder.glob(f".*{TEMP_SUFFIX}")):
        if candidate.is_file():
            _remove_quietly(candidate)
            removed.append(candidate)
    if removed:
        logger.info("removed %d temp file(s) left by an interrupted run in %s", len(removed), folder)
    return removed
