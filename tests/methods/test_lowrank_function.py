"""``AdaptedLinear`` (``pruners/lowrank_function.py``) against autograd through ``effective_weight()``.

The function promises autograd's numbers bit for bit: the same kernel calls on the same shapes,
strides and dtypes, one torch thread (*same order*, ``tests/tolerances.py``), so every comparison
here is ``torch.equal``. Each case runs the reference (the adapter's forward as it was:
``F.linear(x, wrapper.effective_weight(), bias)`` with autograd) and the function on twin adapters
with the same values, over several micro-batches with an optimizer step between steps.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from pruners.layers import weight_as_out_in
from pruners.lowrank import LowRankLinear
from pruners.lowrank_function import Workspace

from method_cases import one_thread  # noqa: F401  (one_thread: autouse fixture)


def pruned_layer(layer_kind: str, dtype: torch.dtype, bias: bool, out_f: int = 24, in_f: int = 16):
    torch.manual_seed(0)
    layer = nn.Linear(in_f, out_f, bias=bias) if layer_kind == "linear" else Conv1D(out_f, in_f)
    keep = torch.rand(out_f, in_f) > 0.5
    with torch.no_grad():
        weight_as_out_in(layer).mul_(keep)
        if layer_kind == "conv1d" and not bias:
            layer.bias = None
    return layer.to(dtype).requires_grad_(False), keep


def reference_forward(wrapper: LowRankLinear, x: torch.Tensor) -> torch.Tensor:
    """The adapter's forward before ``AdaptedLinear``: autograd through the effective weight."""
    return F.linear(x, wrapper.effective_weight(), wrapper.base.bias)


def inputs(shape: str, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if shape == "2d":
        return torch.randn(6, 16, generator=generator).to(dtype)
    if shape == "3d":
        return torch.randn(2, 5, 16, generator=generator).to(dtype)
    return torch.randn(5, 2, 16, generator=generator).to(dtype).transpose(0, 1)  # 3-D, not contiguous


def run_steps(wrapper: LowRankLinear, forward, shape: str, dtype: torch.dtype, x_grad: bool) -> list:
    """Three steps of two micro-batches and an AdamW step; every output, gradient and parameter."""
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.AdamW([wrapper.lora_A, wrapper.lora_B], lr=0.1, foreach=False)
    seen = []
    for _ in range(3):
        for _ in range(2):
            x = inputs(shape, dtype, generator).requires_grad_(x_grad)
            out = forward(wrapper, x)
            (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
            seen += [out.detach(), x.grad]
        seen += [wrapper.lora_A.grad.clone(), wrapper.lora_B.grad.clone()]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen += [wrapper.lora_A.detach().clone(), wrapper.lora_B.detach().clone()]
        with torch.no_grad():
            seen.append(forward(wrapper, inputs(shape, dtype, generator)))  # an evaluation forward
    return seen


@pytest.mark.parametrize("kind", ("masklora", "lora", "scalelora"))
@pytest.mark.parametrize("layer_kind", ("linear", "conv1d"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("bias", (True, False))
@pytest.mark.parametrize("shape", ("2d", "3d", "3d-strided"))
def test_adapted_linear_is_autograd_bit_for_bit(kind, layer_kind, dtype, bias, shape) -> None:
    layer, keep = pruned_layer(layer_kind, dtype, bias)
    wrapper = LowRankLinear(layer, keep, kind=kind, rank=4, alpha=8.0, seed=3)
    with torch.no_grad():
        wrapper.lora_B.normal_(generator=torch.Generator().manual_seed(2))  # a non-zero update from step 0
    twin = copy.deepcopy(wrapper)
    expected = run_steps(twin, reference_forward, shape, dtype, x_grad=True)
    actual = run_steps(wrapper, LowRankLinear.forward, shape, dtype, x_grad=True)
    assert wrapper._weight_cache.weight is not None  # the forward went through AdaptedLinear
    assert len(actual) == len(expected)
    for index, (a, e) in enumerate(zip(actual, expected)):
        # same order: the same kernel calls on the same shapes, strides and dtypes
        assert a.dtype == e.dtype and torch.equal(a, e), f"item {index} differs"


def test_the_weight_is_built_once_per_version_and_rewritten_in_place() -> None:
    layer, keep = pruned_layer("linear", torch.float32, True)
    wrapper = LowRankLinear(layer, keep, kind="masklora", rank=4, alpha=8.0, seed=0)
    first = wrapper.current_weight()
    assert wrapper.current_weight() is first  # nothing changed: the same tensor
    with torch.no_grad():
        wrapper.lora_B.fill_(0.5)  # a new version of B
    second = wrapper.current_weight()
    assert second is first  # no graph held it: rewritten in place
    assert torch.equal(second, wrapper.effective_weight().detach())  # no arithmetic: the same formula
    assert torch.all(second[~keep] == 0)  # masklora never fills a pruned position


def test_a_graph_not_yet_backpropagated_keeps_its_weight() -> None:
    layer, keep = pruned_layer("linear", torch.float32, False)
    wrapper = LowRankLinear(layer, keep, kind="masklora", rank=4, alpha=8.0, seed=0)
    with torch.no_grad():
        wrapper.lora_B.fill_(0.5)
    x = torch.randn(3, 16)
    pending = wrapper(x)  # its graph holds the current weight
    held = wrapper.current_weight()
    before = held.clone()
    with torch.no_grad():
        layer.weight.mul_(2.0)  # legal under autograd too: the reference's graph does not hold W itself
    assert wrapper.current_weight() is not held  # a new tensor: the pending graph's weight is untouched
    assert torch.equal(held, before)  # no arithmetic: nothing wrote to it
    pending.sum().backward()  # still valid
    assert wrapper.lora_A.grad is not None


def test_load_through_data_needs_forget_weight() -> None:
    layer, keep = pruned_layer("linear", torch.float32, False)
    wrapper = LowRankLinear(layer, keep, kind="lora", rank=4, alpha=8.0, seed=0)
    stale = wrapper.current_weight().clone()
    wrapper.lora_B.data.fill_(1.0)  # invisible to the version counter
    assert torch.equal(wrapper.current_weight(), stale)
    wrapper.forget_weight()
    assert torch.equal(wrapper.current_weight(), wrapper.effective_weight().detach())  # no arithmetic: same formula


def test_workspace_is_shared_and_reused() -> None:
    workspace = Workspace()
    layers = [pruned_layer("linear", torch.float32, False) for _ in range(2)]
    wrappers = [LowRankLinear(layer, keep, kind="masklora", rank=4, alpha=8.0, seed=0, workspace=workspace)
                for layer, keep in layers]
    for wrapper in wrappers:
        wrapper(torch.randn(3, 16, requires_grad=True)).sum().backward()
    assert len(workspace._buffers) == 1  # one float32 scratch for both adapters, forward and backward
    scratch = workspace.take((24, 16), torch.float32, torch.device("cpu"))
    assert workspace.take((16, 24), torch.float32, torch.device("cpu")).data_ptr() == scratch.data_ptr()


def test_an_adapter_loaded_again_takes_the_effective_weight_given_back() -> None:
    workspace = Workspace()
    layer, keep = pruned_layer("linear", torch.float32, False)
    first = LowRankLinear(layer, keep, kind="masklora", rank=4, alpha=8.0, seed=0, workspace=workspace)
    given = first.current_weight()
    first.forget_weight()  # the block is released: its adapters' weights go to the workspace
    again = LowRankLinear(layer, keep, kind="masklora", rank=4, alpha=8.0, seed=0, workspace=workspace,
                          factors=(first.lora_A, first.lora_B))  # the next load, the same parameters
    with torch.no_grad():
        again.lora_B.fill_(0.25)
    assert again.current_weight() is given  # no new weight-sized memory
    assert torch.equal(again.current_weight(), again.effective_weight().detach())  # no arithmetic: the same formula
    assert workspace.spare(given) is None  # taken


def test_a_weight_held_by_a_pending_graph_is_not_given_back() -> None:
    workspace = Workspace()
    layer, keep = pruned_layer("linear", torch.float32, False)
    wrapper = LowRankLinear(layer, keep, kind="masklora", rank=4, alpha=8.0, seed=0, workspace=workspace)
    pending = wrapper(torch.randn(3, 16))
    wrapper.forget_weight()
    assert workspace.spare(weight_as_out_in(layer)) is None  # the graph still needs it
    pending.sum().backward()
