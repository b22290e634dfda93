"""The one safetensors header reader agrees with the safetensors library."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from reconstruct.modelio.safetensors_header import header_numel, read_safetensors_header


def test_header_lists_every_tensor_with_its_shape_and_no_metadata(tmp_path):
    tensors = {"a.weight": torch.zeros(3, 5), "b.bias": torch.ones(7, dtype=torch.float16), "s": torch.tensor(2.0)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    header = read_safetensors_header(path)
    with safe_open(path, framework="pt") as handle:
        assert set(header) == set(handle.keys())
    assert {name: entry["shape"] for name, entry in header.items()} == {"a.weight": [3, 5], "b.bias": [7], "s": []}
    assert {name: header_numel(entry) for name, entry in header.items()} == {"a.weight": 15, "b.bias": 7, "s": 1}
    start, end = header["b.bias"]["data_offsets"]
    assert end - start == 7 * 2  # float16 bytes
