"""Lazy, per-tensor reading of checkpoint shards (safetensors or PyTorch ``.bin``).

Nothing here materialises the whole model: safetensors are opened with ``safe_open`` and
read tensor by tensor; ``.bin`` shards are memory-mapped with ``torch.load(mmap=True)``.
Every safetensors shard is checked against its header when the reader opens the folder, so a
truncated file is one ``DamagedFileError`` naming it, never a library traceback mid-job.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from reconstruct.modelio.safetensors_header import (HEADER_LENGTH_BYTES, DamagedFileError, check_safetensors_file,
                                                    read_safetensors_header)

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
# safetensors dtype names → torch dtypes, for tensors read byte for byte (``CheckpointReader.stored``)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointReader:
    """Map checkpoint tensor names to shard files and read them one at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.key_to_file = self._index_shards()
        self._open_files: dict[str, object] = {}
        self._layouts: dict[str, tuple[int, dict[str, dict]]] = {}  # shard → (first data byte, header)

    def _index_shards(self) -> dict[str, str]:
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            index_path = self.folder / index_name
            if index_path.is_file():
                key_to_file = _weight_map(index_path)
                for name in sorted(set(key_to_file.values())):
                    self._check_shard(self.folder / name, index_path)
                return key_to_file
        shards = sorted(self.folder.glob("*.safetensors")) or sorted(self.folder.glob("pytorch_model*.bin"))
        if not shards:
            raise ValueError(f"--model {self.folder}: no *.safetensors or pytorch_model*.bin checkpoint found")
        key_to_file: dict[str, str] = {}
        for shard in shards:
            for key in self._keys_of(shard):
                key_to_file[key] = shard.name
        return key_to_file

    def _keys_of(self, shard: Path) -> list[str]:
        if shard.suffix == ".safetensors":
            return list(check_safetensors_file(shard))
        return list(self._bin(shard.name).keys())

    @staticmethod
    def _check_shard(path: Path, index_path: Path) -> None:
        """A shard the index names: present, and complete when it is safetensors."""
        if not path.is_file():
            raise DamagedFileError(path, f"missing, though {index_path.name} names it (copy or download it again)")
        if path.suffix == ".safetensors":
            check_safetensors_file(path)

    def _bin(self, filename: str) -> dict[str, torch.Tensor]:
        if filename not in self._open_files:
            path = self.folder / filename
            try:
                self._open_files[filename] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except (RuntimeError, EOFError, OSError) as error:
                if isinstance(error, OSError) and error.errno is not None:
                    raise  # unreadable (permissions, IO): the command line reports the OS error
                raise DamagedFileError(path, f"not a readable PyTorch checkpoint ({str(error).splitlines()[0]}); "
                                             "copy or download it again") from None
        return self._open_files[filename]  # type: ignore[return-value]

    def keys(self) -> list[str]:
        """All tensor names stored in the checkpoint."""
        return list(self.key_to_file)

    def files(self) -> list[str]:
        """The shard file names, sorted."""
        return sorted(set(self.key_to_file.values()))

    def read(self, key: str) -> torch.Tensor:
        """Read one tensor (on CPU, in its stored dtype)."""
        filename = self.key_to_file[key]
        if filename.endswith(".safetensors"):
            if filename not in self._open_files:
                self._open_files[filename] = safe_open(self.folder / filename, framework="pt")
            return self._open_files[filename].get_tensor(key)  # type: ignore[attr-defined]
        return self._bin(filename)[key]

    def stored(self, key: str) -> tuple[torch.dtype, tuple[int, ...], int] | None:
        """``(dtype, shape, nbytes)`` of a tensor stored in a safetensors shard in a dtype torch reads as
        is, else None (a ``.bin`` shard, or a dtype ``read`` converts): such a tensor can be ``read_into`` a buffer."""
        filename = self.key_to_file[key]
        if not filename.endswith(".safetensors"):
            return None
        entry = self._layout(filename)[1][key]
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            return None
        start, end = entry["data_offsets"]
        return dtype, tuple(entry["shape"]), end - start

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Read a tensor's stored bytes into ``out``, a (nbytes,) uint8 CPU tensor (``stored`` gives nbytes).

        Plain reads from the file: the bytes come from the page cache without mapping the shard.
        """
        filename = self.key_to_file[key]
        data_start, header = self._layout(filename)
        start, end = header[key]["data_offsets"]
        view = memoryview(out.numpy()).cast("B")
        if len(view) != end - start:
            raise ValueError(f"{key}: a buffer of {len(view)} bytes for {end - start}")
        with open(self.folder / filename, "rb", buffering=0) as handle:
            handle.seek(data_start + start)
            done = 0
            while done < len(view):
                got = handle.readinto(view[done:])
                if not got:
                    raise DamagedFileError(self.folder / filename, f"ended inside {key} (copy or download it again)")
                done += got

    def _layout(self, filename: str) -> tuple[int, dict[str, dict]]:
        if filename not in self._layouts:
            path = self.folder / filename
            with open(path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(HEADER_LENGTH_BYTES))
            self._layouts[filename] = (HEADER_LENGTH_BYTES + length, read_safetensors_header(path))
        return self._layouts[filename]

    def close(self) -> None:
        """Drop open handles and memory maps."""
        self._open_files.clear()


def _weight_map(index_path: Path) -> dict[str, str]:
    """The ``weight_map`` of a shard index file (tensor name -> shard file name)."""
    try:
        return dict(json.loads(index_path.read_text())["weight_map"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        raise DamagedFileError(index_path, "not a shard index (JSON with a weight_map); copy or download it again") from None


def match_checkpoint_keys(model_keys: list[str], checkpoint_keys: list[str], base_prefix: str,
                          renamed: dict[str, str] | None = None) -> dict[str, str]:
    """Pair each model state-dict key with its checkpoint key.

    Checkpoints saved from the bare base model (``facebook/opt-30b``: ``decoder.layers.0...``)
    lack the ``base_model_prefix`` that the causal-LM wrapper adds (``model.decoder...``), and
    some add it where the model has none; both are accepted.

    Args:
        model_keys: the skeleton's state-dict keys.
        checkpoint_keys: the keys stored in the checkpoint.
        base_prefix: the model's ``base_model_prefix``.
        renamed: ``{renamed key: stored key}`` from transformers' renamings (``modelio.conversions``).

    Returns:
        ``{model_key: checkpoint_key}`` for every model key found; missing keys are left out.
    """
    stored = {key: key for key in checkpoint_keys}
    for name, key in (renamed or {}).items():
        stored.setdefault(name, key)
    available = set(stored)
    mapping: dict[str, str] = {}
    for key in model_keys:
        candidates = [key]
        if base_prefix and key.startswith(base_prefix + "."):
            candidates.append(key[len(base_prefix) + 1 :])
        elif base_prefix:
            candidates.append(f"{base_prefix}.{key}")
        for candidate in candidates:
            if candidate in available:
                mapping[key] = stored[candidate]
                break
    return mapping
