"""Lazy, per-tensor reading of checkpoint shards (safetensors or PyTorch ``.bin``).

Nothing here materialises the whole model: safetensors are opened with ``safe_open`` and
read tensor by tensor; ``.bin`` shards are memory-mapped with ``torch.load(mmap=True)``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointReader:
    """Map checkpoint tensor names to shard files and read them one at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.key_to_file = self._index_shards()
        self._open_files: dict[str, object] = {}

    def _index_shards(self) -> dict[str, str]:
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            index_path = self.folder / index_name
            if index_path.is_file():
                return dict(json.loads(index_path.read_text())["weight_map"])
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
            with safe_open(shard, framework="pt") as handle:
                return list(handle.keys())
        return list(self._bin(shard.name).keys())

    def _bin(self, filename: str) -> dict[str, torch.Tensor]:
        if filename not in self._open_files:
            path = self.folder / filename
            self._open_files[filename] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
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

    def close(self) -> None:
        """Drop open handles and memory maps."""
        self._open_files.clear()


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
