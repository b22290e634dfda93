"""The one reader of a safetensors file's header (tensor names, dtypes, shapes, offsets; no data).

It also tells a damaged file from a good one before any tensor is read (``check_safetensors_file``):
a copy or download that stopped early keeps its header and loses its end, which the safetensors
library reports only as "incomplete metadata, file not fully covered".
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

HEADER_LENGTH_BYTES = 8  # little-endian u64 in front of the JSON header
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit


class DamagedFileError(ValueError):
    """A model file that cannot be read as what its name says: truncated, empty, not the format.

    ``str()`` names the file and what is wrong; the command line puts the flag in front of it.
    """

    def __init__(self, path: Path | str, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def read_safetensors_header(path: Path | str) -> dict[str, dict]:
    """The tensor entries of a safetensors file's header, without ``__metadata__``.

    The file starts with an 8-byte little-endian header length, then that many bytes of JSON.

    Args:
        path: a ``.safetensors`` file.

    Returns:
        ``{tensor name: {"dtype", "shape", "data_offsets"}}`` in the header's order.

    Raises:
        DamagedFileError: when the header cannot be read (a file cut inside it, or not safetensors).
    """
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        prefix = handle.read(HEADER_LENGTH_BYTES)
        if len(prefix) < HEADER_LENGTH_BYTES:
            raise DamagedFileError(path, f"truncated: {size:,} bytes present, not even the 8-byte header length "
                                         "(copy or download it again)")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise DamagedFileError(path, "not a safetensors file (its first 8 bytes are not a header length)")
        if HEADER_LENGTH_BYTES + length > size:
            raise DamagedFileError(path, f"truncated: {size:,} bytes present, its header alone needs "
                                         f"{HEADER_LENGTH_BYTES + length:,} (copy or download it again)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DamagedFileError(path, "not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise DamagedFileError(path, "not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    return header


def check_safetensors_file(path: Path | str) -> dict[str, dict]:
    """Check that a safetensors file holds all the bytes its header describes; return the header.

    Reads the header only, so it costs the same for a 100 KB and a 10 GB shard.

    Raises:
        DamagedFileError: truncated (bytes present vs expected), padded, or not safetensors.
    """
    header = read_safetensors_header(path)
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(HEADER_LENGTH_BYTES))
    try:
        data_bytes = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    except (KeyError, IndexError, TypeError):
        raise DamagedFileError(path, "not a safetensors file (a header entry has no data_offsets)") from None
    expected = HEADER_LENGTH_BYTES + length + data_bytes
    size = os.path.getsize(path)
    if size < expected:
        raise DamagedFileError(path, f"truncated: {size:,} bytes present, {expected:,} expected "
                                     "(copy or download it again)")
    if size > expected:
        raise DamagedFileError(path, f"{size:,} bytes, {expected:,} expected from its header: "
                                     "not a complete safetensors file (copy or download it again)")
    return header


def header_numel(entry: dict) -> int:
    """Number of elements of one header entry (the product of its shape; 1 for a scalar)."""
    numel = 1
    for size in entry["shape"]:
        numel *= size
    return numel
