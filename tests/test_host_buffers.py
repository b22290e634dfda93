"""Block reads into reused host buffers (``modelio.host_buffers``, ``CheckpointReader.read_into``)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from reconstruct.modelio.block_io import read_module_tensors
from reconstruct.modelio.checkpoint import CheckpointReader
from reconstruct.modelio.host_buffers import ReusableBuffers, _use_count

pytestmark = pytest.mark.skipif(_use_count(torch.empty(1)) is None, reason="this torch cannot count a storage's users")


def test_a_buffer_is_reused_only_once_no_view_of_it_is_left():
    buffers = ReusableBuffers(max_buffers=2)
    first = buffers.take(1000)
    view = first[100:200].view(torch.float32)
    pointer = first.data_ptr()
    del first
    second = buffers.take(1000)
    assert second.data_ptr() != pointer  # a view of the first is still alive
    del view, second
    assert buffers.take(800).data_ptr() == pointer  # nothing views it any more: the same bytes again


def test_more_reads_in_flight_than_the_pool_holds_get_fresh_buffers():
    buffers = ReusableBuffers(max_buffers=1)
    held = [buffers.take(64) for _ in range(3)]
    assert len({buffer.data_ptr() for buffer in held}) == 3
    assert len(buffers._buffers) == 1


def test_tensors_read_into_a_buffer_equal_the_library_s_read(tmp_path):
    torch.manual_seed(0)
    stored = {"layer.weight": torch.randn(7, 5), "layer.bias": torch.randn(7).to(torch.bfloat16),
              "layer.ids": torch.arange(3, dtype=torch.int64), "norm.weight": torch.randn(5).half()}
    save_file(stored, tmp_path / "model.safetensors")
    module = torch.nn.Module()
    module.layer = torch.nn.Linear(5, 7)
    module.layer.weight.data = torch.empty(7, 5)
    module.layer.bias.data = torch.empty(7, dtype=torch.bfloat16)
    module.layer.register_buffer("ids", torch.empty(3, dtype=torch.int64))
    module.norm = torch.nn.Module()
    module.norm.weight = torch.nn.Parameter(torch.empty(5, dtype=torch.float16))
    reader = CheckpointReader(tmp_path)
    key_map = {f"block.{name}": name for name in stored}
    buffers = ReusableBuffers()
    for _ in range(2):  # the second read reuses the first's buffer: the values are read again, not left over
        read = read_module_tensors(module, "block.", reader, key_map, own=True, buffers=buffers)
        assert read.keys() == stored.keys()
        for name, tensor in stored.items():
            assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor)  # the same stored bytes
            assert read[name].data_ptr() % 64 == 0
        del read
