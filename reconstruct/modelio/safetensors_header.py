"""The one reader of a safetensors file's header (tensor names, dtypes, shapes, offsets; no data)."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def read_safetensors_header(path: Path | str) -> dict[str, dict]:
    """The tensor entries of a safetensors file's header, without ``__metadata__``.

    The file starts with an 8-byte little-endian header length, then that many bytes of JSON.

    Args:
        path: a ``.safetensors`` file.

    Returns:
        ``{tensor name: {"dtype", "shape", "data_offsets"}}`` in the header's order.
    """
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def header_numel(entry: dict) -> int:
    """Number of elements of one header entry (the product of its shape; 1 for a scalar)."""
    numel = 1
    for size in entry["shape"]:
        numel *= size
    return numel
