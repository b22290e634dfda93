"""Unit tests of the pieces: adapter wrappers, float32 masters, the spec, the training loop's helpers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from reconstruct.methods import METHOD_NAMES, ReconSpec, attach_method, evaluate_mse, train_reconstruction
from pruners.layers import weight_as_out_in
from reconstruct.methods.adapters import LowRankLinear, init_lora_a
from reconstruct.methods.attach import layer_seed
from reconstruct.methods.bias_norm import MasterParam, find_norms
from reconstruct.methods.samples import SampleOrder


from method_cases import Stream, one_thread  # noqa: F401  (one_thread: autouse fixture)
from tolerances import assert_within, gamma, linear_bound


def pruned_layer(kind: str, out_f: int = 12, in_f: int = 8, seed: int = 0):
    """An nn.Linear or Conv1D with half its weights zeroed, and its (out, in) keep mask."""
    torch.manual_seed(seed)
    layer = nn.Linear(in_f, out_f) if kind == "linear" else Conv1D(out_f, in_f)
    keep = torch.rand(out_f, in_f) > 0.5
    with torch.no_grad():
        weight_as_out_in(layer).mul_(keep)
    layer.requires_grad_(False)
    return layer, keep


def assert_same_output(actual, expected, x, weight, bias, same_kernel: bool) -> None:
    """Two float32 evaluations of ``x @ weight.T + bias``: equal bits from one kernel, else within twice its bound."""
    if same_kernel:  # F.linear on the same values and shapes: the same summation order, the same bits
        assert torch.equal(actual, expected)
    else:  # another kernel (Conv1D's addmm, or matmul then add): each within gamma_(in+1) of the exact value
        assert_within(actual, expected, 2 * linear_bound(x, weight, bias))


def randomise(wrapper: LowRankLinear) -> None:
    with torch.no_grad():
        wrapper.lora_B.normal_()


LAYERS = ("linear", "conv1d")
KINDS = ("masklora", "scalelora", "lora")


@pytest.mark.parametrize("layer_kind", LAYERS)
@pytest.mark.parametrize("kind", KINDS)
def test_fresh_adapter_is_the_identity(kind: str, layer_kind: str) -> None:
    layer, keep = pruned_layer(layer_kind)
    wrapper = LowRankLinear(layer, keep, kind=kind, rank=4, alpha=8.0, seed=0)
    x = torch.randn(3, 5, 8)
    # B = 0 (or B A = 1 exactly for scalelora: four products 0.5 * 0.5): the effective weight is W bit for bit
    assert torch.equal(wrapper.effective_weight(), weight_as_out_in(layer))
    assert_same_output(wrapper(x), layer(x), x, weight_as_out_in(layer), layer.bias, layer_kind == "linear")
    assert wrapper.lora_A.dtype == wrapper.lora_B.dtype == torch.float32
    assert wrapper.weight is layer.weight and wrapper.bias is layer.bias


@pytest.mark.parametrize("layer_kind", LAYERS)
def test_adapter_forms(layer_kind: str) -> None:
    layer, keep = pruned_layer(layer_kind)
    weight = weight_as_out_in(layer).clone()
    effective = {}
    for kind in KINDS:
        wrapper = LowRankLinear(layer, keep, kind=kind, rank=4, alpha=8.0, seed=0)
        randomise(wrapper)
        ba = wrapper.lora_B @ wrapper.lora_A
        ba = ba if kind == "scalelora" else 2.0 * ba  # scalelora has no alpha / r scaling
        effective[kind] = (wrapper.effective_weight().detach(), ba)
        x = torch.randn(2, 8)
        assert_same_output(wrapper(x), x @ effective[kind][0].T + layer.bias, x, effective[kind][0], layer.bias,
                           same_kernel=False)
    # the same B @ A kernel, an exact scaling by 2 and a 0/1 mask: W + delta is computed the same way here
    w_lora, ba = effective["lora"]
    assert torch.equal(w_lora, weight + ba)
    w_mask, ba = effective["masklora"]
    assert torch.equal(w_mask, weight + keep * ba)
    assert torch.all(w_mask[~keep] == 0)
    w_scale, ba = effective["scalelora"]
    # W + (BA - 1) W against BA W: three roundings against one, each relative to |W||BA - 1| or |W||BA|
    assert_within(w_scale, weight * ba, gamma(3) * weight.double().abs() * ((ba.double() - 1).abs() + ba.double().abs()))
    assert torch.all(w_scale[~keep] == 0)


@pytest.mark.parametrize("layer_kind", LAYERS)
@pytest.mark.parametrize("kind", ("masklora", "scalelora"))
def test_commit_writes_the_layer_in_its_own_orientation(kind: str, layer_kind: str) -> None:
    layer, keep = pruned_layer(layer_kind)
    parameter = layer.weight
    wrapper = LowRankLinear(layer, keep, kind=kind, rank=4, alpha=8.0, seed=0)
    randomise(wrapper)
    x = torch.randn(4, 8)
    expected = wrapper(x).detach()
    effective = wrapper.effective_weight().detach()
    wrapper.commit(wrapper.merged_weight())
    assert layer.weight is parameter
    assert torch.equal(weight_as_out_in(layer), effective)  # zero outside the mask already; nothing vanished
    assert_same_output(layer(x), expected, x, effective, layer.bias, layer_kind == "linear")
    assert torch.equal(weight_as_out_in(layer) != 0, keep & (weight_as_out_in(layer) != 0))


def test_kept_weight_that_cancels_stays_nonzero() -> None:
    layer, keep = pruned_layer("linear")
    wrapper = LowRankLinear(layer, keep, kind="masklora", rank=1, alpha=1.0, seed=0)
    row, col = map(int, torch.nonzero(keep)[0])
    with torch.no_grad():  # make delta == -W at one kept position and nowhere else
        wrapper.lora_A.zero_()
        wrapper.lora_A[0, col] = 1.0
        wrapper.lora_B.zero_()
        wrapper.lora_B[row, 0] = -layer.weight[row, col]
    assert wrapper.effective_weight()[row, col] == 0
    merged = wrapper.merged_weight()
    tiny = math.copysign(torch.finfo(torch.float32).tiny, float(layer.weight[row, col]))
    assert float(merged[row, col]) == tiny  # the smallest normal float32 of the weight's sign, exactly
    assert torch.equal(merged != 0, layer.weight != 0)


def test_adapter_init_is_peft_like_and_seeded() -> None:
    a = init_lora_a(16, 576, seed=3)
    # (2 r - 1) is in [-1, 1) and rounding is monotone, so |fl((2 r - 1) b)| <= fl(b), the bound in float32
    assert a.shape == (16, 576) and float(a.abs().max()) <= float(torch.tensor(1 / math.sqrt(576)))
    assert torch.equal(a, init_lora_a(16, 576, seed=3))
    assert not torch.equal(a, init_lora_a(16, 576, seed=4))
    assert layer_seed(0, "mlp.up_proj") != layer_seed(0, "mlp.down_proj")
    assert layer_seed(7, "mlp.up_proj") == layer_seed(7, "mlp.up_proj")


def test_master_param_trains_in_float32_and_restores_in_place() -> None:
    norm = nn.LayerNorm(8).to(torch.bfloat16)
    order = list(norm._parameters)
    weight = norm.weight
    masters = [MasterParam(norm, a, a, order=order) for a in ("weight", "bias")]
    assert all(m.master.dtype == torch.float32 for m in masters)
    out = norm(torch.randn(2, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert masters[0].master.grad is not None and masters[0].master.grad.dtype == torch.float32
    with torch.no_grad():
        masters[0].master.add_(0.5)
    for m in masters:
        m.restore(m.value())
    assert norm.weight is weight and list(norm._parameters) == order
    assert torch.all(norm.weight == 1.5)
    assert isinstance(norm.weight, nn.Parameter) and "weight" not in norm.__dict__


def test_new_bias_is_zero_initialised_and_removed_on_discard() -> None:
    linear = nn.Linear(8, 4, bias=False)
    linear.requires_grad_(False)
    x = torch.randn(3, 8)
    expected = linear(x)
    master = MasterParam(linear, "bias", "bias", new_bias_of=linear.weight)
    assert master.is_new and master.master.shape == (4,)
    assert torch.equal(master.master, torch.zeros(4))
    # adding a zero bias is exact, but addmm may sum in another order than mm: within twice the bound
    assert_within(linear(x), expected, 2 * linear_bound(x, linear.weight))
    master.restore(None)
    assert linear.bias is None and list(linear._parameters) == ["weight", "bias"]


def test_find_norms_is_generic() -> None:
    class RMSNormLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

    block = nn.Module()
    block.ln = nn.LayerNorm(4)
    block.rms = RMSNormLike()
    block.plain = nn.LayerNorm(4, elementwise_affine=False)
    block.proj = nn.Linear(4, 4)
    assert list(find_norms(block)) == ["ln", "rms"]


def test_spec_defaults_and_validation() -> None:
    spec = ReconSpec()
    assert spec.method == "masklora" and spec.lr == 5e-3 and spec.rank == 16 and spec.alpha == 32.0
    assert spec.steps > 0 and spec.batch_size >= spec.micro_batch >= 1 and spec.weight_decay == 0.0
    assert METHOD_NAMES == ("none", "bias", "ln", "bias-ln", "masklora", "scalelora", "lora")
    with pytest.raises(ValueError, match="--method must be one of"):
        ReconSpec(method="dora")
    with pytest.raises(ValueError, match="--allow-dense-merge"):
        ReconSpec(method="lora")
    assert ReconSpec(method="lora", allow_dense_merge=True).allow_dense_merge
    for bad in (dict(steps=-1), dict(lr=0.0), dict(rank=0), dict(batch_size=0), dict(micro_batch=0)):
        with pytest.raises(ValueError):
            ReconSpec(**bad)


def _block_with(layer: nn.Module) -> nn.Module:
    block = nn.Module()
    block.proj = layer
    return block


def test_attach_rejects_bad_inputs() -> None:
    layer, keep = pruned_layer("linear")
    block = _block_with(layer)
    linears = {"proj": layer}
    with pytest.raises(ValueError, match="--method"):
        attach_method("dora", block, linears, {"proj": keep}, rank=4, alpha=8.0, bias_linears=set())
    with pytest.raises(ValueError, match="no keep mask"):
        attach_method("masklora", block, linears, {}, rank=4, alpha=8.0, bias_linears=set())
    with pytest.raises(ValueError, match="shape"):
        attach_method("masklora", block, linears, {"proj": keep.t()}, rank=4, alpha=8.0, bias_linears=set())
    with pytest.raises(ValueError, match="outside the keep mask"):
        attach_method("masklora", block, linears, {"proj": ~keep}, rank=4, alpha=8.0, bias_linears=set())
    with pytest.raises(ValueError, match="not among"):
        attach_method("bias", block, linears, {"proj": keep}, rank=4, alpha=8.0, bias_linears={"other"})
    assert block.proj is layer


def test_handle_counts_and_closes() -> None:
    layer, keep = pruned_layer("conv1d")
    block = _block_with(layer)
    handle = attach_method("scalelora", block, {"proj": layer}, {"proj": keep}, rank=4, alpha=8.0,
                           bias_linears=set())
    assert isinstance(block.proj, LowRankLinear)
    assert handle.num_trainable == 4 * 8 + 12 * 4
    report = handle.merge()
    assert block.proj is layer and report.merged_tensors == ["proj.weight"]
    with pytest.raises(RuntimeError, match="already merged"):
        handle.merge()


def test_training_without_steps_or_params_changes_nothing() -> None:
    layer, keep = pruned_layer("linear", out_f=8)
    x = torch.randn(6, 3, 8)
    y = x + 0.1
    block = _block_with(layer)
    handle = attach_method("bias", block, {"proj": layer}, {"proj": keep}, rank=4, alpha=8.0, bias_linears=set())
    bias_before = handle.trainable_parameters()[0].detach().clone()
    spec = ReconSpec(method="bias", steps=0)
    result = train_reconstruction(block.proj, handle.trainable_parameters(), Stream(x), Stream(y), spec, seed=0)
    assert result.steps == 0 and result.mse_after == result.mse_before
    assert torch.equal(handle.trainable_parameters()[0], bias_before)
    result = train_reconstruction(block.proj, [], Stream(x), Stream(y), ReconSpec(method="bias"), seed=0)
    assert result.steps == 0


def test_training_fits_a_bias_whatever_the_micro_batch() -> None:
    layer, keep = pruned_layer("linear", out_f=8)
    x = torch.randn(10, 3, 8)
    with torch.no_grad():
        y = layer(x) + torch.linspace(-1, 1, 8)  # the best bias is known: the loss can reach 0
    for micro in (1, 3, 10):
        block = _block_with(pruned_layer("linear", out_f=8)[0])
        handle = attach_method("bias", block, {"proj": block.proj}, {"proj": keep}, rank=4, alpha=8.0,
                               bias_linears=set())
        spec = ReconSpec(method="bias", steps=200, lr=2e-2, batch_size=10, micro_batch=micro)
        result = train_reconstruction(block.proj, handle.trainable_parameters(), Stream(x), Stream(y), spec, seed=0)
        # a convergence threshold, not a rounding bound: 200 steps bring the MSE ~3e4 times down, 1e3 asked
        assert result.mse_after < 1e-3 * result.mse_before, micro


def test_micro_batches_accumulate_the_batch_gradient_exactly() -> None:
    """Small integers and 2**8 elements a batch: outputs, residuals, the 2 r / 256 scaling and every gradient
    sum are exact in float32 in any order, so any micro-batch split must give the same bits."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randint(-3, 4, (8, 4, 8), generator=generator).float()  # (n, T, in)
    y = torch.randint(-3, 4, (8, 4, 8), generator=generator).float()  # (n, T, out): 4 * 8 elements a sample
    weight = torch.randint(-2, 3, (8, 8), generator=generator).float()  # (out, in)
    bias = torch.randint(-2, 3, (8,), generator=generator).float()
    residual = x @ weight.T + bias - y  # (n, T, out), integers below 60: exact
    expected = (2 * residual).sum((0, 1)) / residual[0].numel() / x.shape[0]  # d/db of the batch mean: dyadic
    gradients = {}
    for micro in (1, 3, 8):
        layer = nn.Linear(8, 8)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        layer.requires_grad_(False)
        block = _block_with(layer)
        handle = attach_method("bias", block, {"proj": layer}, {"proj": weight != 0}, rank=4, alpha=8.0,
                               bias_linears=set())
        params = handle.trainable_parameters()
        seen = []
        spec = ReconSpec(method="bias", steps=1, lr=2e-2, batch_size=8, micro_batch=micro, loss="mse")
        train_reconstruction(block.proj, params, Stream(x), Stream(y), spec, seed=0,
                             on_gradients=lambda step, params=params, seen=seen: seen.append(params[0].grad.clone()))
        gradients[micro] = seen[0]
    assert expected.abs().sum() > 0
    for micro, gradient in gradients.items():
        assert torch.equal(gradient, expected), micro


def test_evaluate_mse_is_the_plain_mean() -> None:
    x = torch.randn(7, 3, 4)
    y = torch.randn(7, 3, 4)
    mse = evaluate_mse(lambda h: 2 * h, Stream(x), Stream(y), micro_batch=3)
    plain = float(((2 * x - y) ** 2).mean())
    # the same float32 squares, summed (and divided) in float64 there and float32 here: gamma_(n+1) each
    n = x.numel()
    assert abs(mse - plain) <= (gamma(n + 1) + gamma(n + 1, torch.float64)) * plain


def test_sample_order_is_seeded_and_covers_every_sample_each_epoch() -> None:
    order = SampleOrder(10, seed=5)
    batches = [order.take(4) for _ in range(5)]  # 20 draws = two epochs
    again = SampleOrder(10, seed=5)
    assert all(torch.equal(b, again.take(4)) for b in batches)
    drawn = torch.cat(batches)
    assert len(set(drawn[:8].tolist())) == 8  # batches inside one epoch never repeat a sample
    assert torch.bincount(drawn, minlength=10).tolist() == [2] * 10
    assert all(torch.equal(b, torch.sort(b).values) for b in batches)


def test_training_accepts_inference_mode_activations_and_shows_progress() -> None:
    layer, keep = pruned_layer("linear", out_f=8)
    with torch.inference_mode():
        x = torch.randn(4, 3, 8)
        y = layer(x) + 1.0
    block = _block_with(layer)
    handle = attach_method("bias", block, {"proj": layer}, {"proj": keep}, rank=4, alpha=8.0, bias_linears=set())
    spec = ReconSpec(method="bias", steps=5, lr=1e-2, batch_size=2)
    with torch.no_grad():  # the engine may hold no_grad; training turns gradients back on
        result = train_reconstruction(block.proj, handle.trainable_parameters(), Stream(x), Stream(y), spec,
                                      seed=0, progress=True)
    assert result.mse_after < result.mse_before
