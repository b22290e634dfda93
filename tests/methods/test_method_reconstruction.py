"""End to end: attach -> train -> merge on tiny pruned LLaMA / OPT / GPT-2 blocks, for every method."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM
from transformers.pytorch_utils import Conv1D

from reconstruct.methods import METHOD_NAMES, ReconSpec, attach_method, evaluate_mse, train_reconstruction

ARCHS = ("llama", "opt", "gpt2")
HIDDEN, SAMPLES, SEQ = 64, 16, 32
STEPS = 20
TRAINED = tuple(m for m in METHOD_NAMES if m != "none")
SPARSE = tuple(m for m in METHOD_NAMES if m != "lora")


from method_cases import Stream, one_thread  # noqa: F401  (one_thread: autouse fixture)


@dataclass
class Dense:
    """A dense tiny block, its forward kwargs, inputs and the dense outputs."""

    block: nn.Module
    call: Callable[[nn.Module, Tensor], Tensor]  # (block, x) -> y
    x: Tensor
    y: Tensor


def _tiny_model(arch: str) -> nn.Module:
    common = dict(num_hidden_layers=1, vocab_size=128, initializer_range=0.1)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                          **common)
        return LlamaForCausalLM(cfg)
    if arch == "opt":
        cfg = OPTConfig(hidden_size=HIDDEN, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=HIDDEN,
                        max_position_embeddings=SEQ, dropout=0.0, **common)
        return OPTForCausalLM(cfg)
    cfg = GPT2Config(n_embd=HIDDEN, n_inner=128, n_head=4, n_layer=1, n_positions=SEQ, vocab_size=128,
                     initializer_range=0.1, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


@functools.cache
def dense_case(arch: str) -> Dense:
    torch.manual_seed(0)
    model = _tiny_model(arch).eval()
    if arch == "llama":
        block = model.model.layers[0]
        x = torch.randn(SAMPLES, SEQ, HIDDEN)
        position_embeddings = model.model.rotary_emb(x, torch.arange(SEQ)[None])

        def call(b: nn.Module, h: Tensor) -> Tensor:
            return b(h, position_embeddings=tuple(t.to(h.dtype) for t in position_embeddings))
    else:
        block = model.model.decoder.layers[0] if arch == "opt" else model.transformer.h[0]
        x = torch.randn(SAMPLES, SEQ, HIDDEN)

        def call(b: nn.Module, h: Tensor) -> Tensor:
            return b(h)

    for p in block.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        y = call(block, x)
    return Dense(block, call, x, y)


def linears_of(block: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in block.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def weight_oi(m: nn.Module) -> Tensor:
    return m.weight.t() if isinstance(m, Conv1D) else m.weight


@dataclass
class Pruned:
    block: nn.Module
    forward: Callable[[Tensor], Tensor]
    linears: dict[str, nn.Module]
    keep_masks: dict[str, Tensor]
    bias_linears: set[str]
    inputs: Stream
    targets: Stream


def pruned_case(arch: str, dtype: torch.dtype = torch.float32) -> Pruned:
    """A fresh copy of the dense block with 50% of every linear's weights set to zero."""
    dense = dense_case(arch)
    block = copy.deepcopy(dense.block).to(dtype)
    linears = linears_of(block)
    generator = torch.Generator().manual_seed(1)
    keep_masks = {}
    with torch.no_grad():
        for name, linear in linears.items():
            keep = torch.rand(weight_oi(linear).shape, generator=generator) > 0.5
            weight_oi(linear).mul_(keep)
            keep_masks[name] = keep
    return Pruned(
        block=block,
        forward=lambda h: dense.call(block, h),
        linears=linears,
        keep_masks=keep_masks,
        bias_linears=set(linears),  # LLaMA: attention_bias/mlp_bias; OPT/GPT-2 already have biases
        inputs=Stream(dense.x.to(dtype)),
        targets=Stream(dense.y.to(dtype)),
    )


def recon_spec(method: str) -> ReconSpec:
    return ReconSpec(method=method, steps=STEPS, lr=5e-3, batch_size=8, micro_batch=8, allow_dense_merge=True)


def snapshot(block: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in block.state_dict().items()}


@dataclass
class Run:
    case: Pruned
    before: dict[str, Tensor]  # state_dict before attach
    after: dict[str, Tensor]  # state_dict after merge
    wrapped_out: Tensor  # outputs of the trained block, adapters still attached
    merged_out: Tensor  # outputs after the merge
    result: object
    report: object
    added_biases: set[str]
    module_types_before: dict[str, type]


def run_method(method: str, arch: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Run:
    case = pruned_case(arch, dtype)
    types = {n: type(m) for n, m in case.block.named_modules()}
    before = snapshot(case.block)
    spec = recon_spec(method)
    handle = attach_method(method, case.block, case.linears, case.keep_masks, rank=4, alpha=8.0,
                           bias_linears=case.bias_linears, seed=seed)
    result = train_reconstruction(case.forward, handle.trainable_parameters(), case.inputs, case.targets, spec,
                                  seed=seed)
    with torch.no_grad():
        wrapped_out = case.forward(case.inputs.tensor)
    report = handle.merge(allow_dense_merge=True)
    with torch.no_grad():
        merged_out = case.forward(case.inputs.tensor)
    return Run(case, before, snapshot(case.block), wrapped_out, merged_out, result, report,
               handle.added_biases, types)


@functools.cache
def cached_run(method: str, arch: str, dtype: torch.dtype = torch.float32) -> Run:
    return run_method(method, arch, dtype=dtype)


def trained_keys(run: Run, method: str) -> set[str]:
    """state_dict keys the method may change."""
    keys = set()
    if method in ("masklora", "scalelora", "lora"):
        keys |= {f"{n}.weight" for n in run.case.linears}
    if method in ("bias", "bias-ln"):
        keys |= {f"{n}.bias" for n in run.case.linears}
    if method in ("ln", "bias-ln"):
        norms = [n for n, m in run.case.block.named_modules() if "Norm" in type(m).__name__]
        keys |= {f"{n}.{a}" for n in norms for a in ("weight", "bias") if f"{n}.{a}" in run.before}
    return keys


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", SPARSE)
def test_merge_keeps_the_sparsity_pattern_bit_for_bit(method: str, arch: str) -> None:
    run = cached_run(method, arch)
    for name, linear in run.case.linears.items():
        weight = weight_oi(linear)
        before = run.before[f"{name}.weight"]
        before = before.t() if isinstance(linear, Conv1D) else before
        assert torch.equal(weight != 0, before != 0), name
        assert torch.all(weight[~run.case.keep_masks[name]] == 0), name
    assert run.report.densified_positions == 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", TRAINED)
def test_training_lowers_the_reconstruction_error(method: str, arch: str) -> None:
    run = cached_run(method, arch)
    assert run.result.steps == STEPS
    assert run.result.mse_after < run.result.mse_before
    # The same measurement of the float64 run: merging changes the outputs only by float64 rounding
    # (see the merge test below), so the MSE moves by far less than 1e-9 of itself.
    exact = cached_run(method, arch, torch.float64)
    merged_mse = evaluate_mse(exact.case.forward, exact.case.inputs, exact.case.targets, micro_batch=16)
    assert merged_mse == pytest.approx(exact.result.mse_after, rel=1e-9)


@pytest.mark.parametrize("arch", ARCHS)
def test_method_none_trains_nothing(arch: str) -> None:
    run = cached_run("none", arch)
    assert run.result.steps == 0
    assert run.result.mse_after == run.result.mse_before
    assert run.report.merged_tensors == []


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_only_the_methods_parameters_change(method: str, arch: str) -> None:
    run = cached_run(method, arch)
    allowed = trained_keys(run, method)
    new_keys = set(run.after) - set(run.before)
    assert new_keys == {f"{n}.bias" for n in run.added_biases}
    assert set(run.before) <= set(run.after)
    assert [k for k in run.after if k in run.before] == list(run.before)  # order kept
    changed = {k for k in run.before if not torch.equal(run.before[k], run.after[k])}
    assert changed <= allowed
    if method != "none":
        assert changed | new_keys, "training changed nothing"
    # the block has its own module types back, every parameter frozen
    assert {n: type(m) for n, m in run.case.block.named_modules()} == run.module_types_before
    assert not any(p.requires_grad for p in run.case.block.parameters())
    if arch == "llama" and method in ("bias", "bias-ln"):
        assert run.added_biases == set(run.case.linears)
    else:
        assert run.added_biases == set()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_merged_block_computes_what_the_adapted_block_computed(method: str, arch: str) -> None:
    run = cached_run(method, arch)
    # In float64: W x + M(BA) x and (W + M(BA)) x differ by the rounding of sums of at most a few hundred
    # terms per layer (gamma_n(float64) ~ 1e-14 of the terms' size) through one block; 1e-9 of the output's
    # scale is far above that, and far below what a wrong merge (a lost scale, a missed mask) changes.
    run = cached_run(method, arch, torch.float64)
    scale = float(run.wrapped_out.abs().max())
    torch.testing.assert_close(run.merged_out, run.wrapped_out, rtol=0, atol=1e-9 * scale)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_merge_needs_consent_and_reports_densification(arch: str) -> None:
    case = pruned_case(arch)
    before = snapshot(case.block)
    handle = attach_method("lora", case.block, case.linears, case.keep_masks, rank=4, alpha=8.0,
                           bias_linears=case.bias_linears)
    spec = ReconSpec(method="lora", steps=2, lr=5e-3, batch_size=4, micro_batch=4, allow_dense_merge=True)
    train_reconstruction(case.forward, handle.trainable_parameters(), case.inputs, case.targets, spec, seed=0)
    with pytest.raises(ValueError, match="--allow-dense-merge"):
        handle.merge()
    for name, linear in case.linears.items():  # nothing was written
        assert torch.equal(linear.weight, before[f"{name}.weight"])
    report = handle.merge(allow_dense_merge=True)
    assert 0.0 < report.densified_fraction <= 1.0
    assert report.densified_positions > 0
    assert report.pruned_positions == sum(int((~k).sum()) for k in case.keep_masks.values())


def test_lora_spec_without_consent_is_refused_up_front() -> None:
    with pytest.raises(ValueError, match="--allow-dense-merge"):
        ReconSpec(method="lora")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", TRAINED)
def test_non_finite_adapter_blocks_the_merge_and_changes_nothing(method: str, arch: str) -> None:
    case = pruned_case(arch)
    before = snapshot(case.block)
    handle = attach_method(method, case.block, case.linears, case.keep_masks, rank=4, alpha=8.0,
                           bias_linears=case.bias_linears)
    params = handle.trainable_parameters()
    with torch.no_grad():
        params[-1].view(-1)[0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        handle.merge(allow_dense_merge=True)
    handle.discard()
    after = snapshot(case.block)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: type(m) for n, m in case.block.named_modules()} == {
        n: type(m) for n, m in dense_case(arch).block.named_modules()
    }


def test_non_finite_error_names_the_layer() -> None:
    case = pruned_case("llama")
    handle = attach_method("masklora", case.block, case.linears, case.keep_masks, rank=4, alpha=8.0,
                           bias_linears=set())
    with torch.no_grad():
        handle.wrappers["mlp.down_proj"].lora_B.fill_(float("inf"))
    with pytest.raises(RuntimeError, match="mlp.down_proj"):
        handle.merge()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", TRAINED)
def test_same_seed_gives_bit_identical_weights(method: str, arch: str) -> None:
    first = cached_run(method, arch).after
    second = run_method(method, arch).after
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("method", ("masklora", "bias-ln"))
def test_another_seed_gives_other_weights(method: str) -> None:
    first = cached_run(method, "llama").after
    other = run_method(method, "llama", seed=1).after
    assert any(not torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("method", ("bias-ln", "masklora", "scalelora"))
def test_bfloat16_block_trains_float32_parameters_and_stays_sparse(method: str) -> None:
    run = run_method(method, "llama", dtype=torch.bfloat16)
    assert run.result.mse_after < run.result.mse_before
    assert all(v.dtype == torch.bfloat16 for v in run.after.values())
    for name, linear in run.case.linears.items():
        assert torch.equal(linear.weight != 0, run.before[f"{name}.weight"] != 0)
    torch.testing.assert_close(run.merged_out, run.wrapped_out, rtol=0, atol=0)


# --------------------------------------------------------------------------- a rank's share of a step
@pytest.mark.parametrize(("batch", "rank_bounds", "want"), [
    ([0, 1, 2], (0, 4), [[0, 1], [2]]),  # all on this rank
    ([0, 1, 2], (4, 8), []),  # none on this rank: no slice at all (split gave one empty slice)
    ([1, 5, 6], (0, 4), [[1]]),  # uneven: 1 here ...
    ([1, 5, 6], (4, 8), [[1, 2]]),  # ... 2 on the other rank, local indices
    ([3, 4, 5, 6, 7], (4, 8), [[0, 1], [2, 3]]),
])
def test_local_micro_batches_hold_only_this_rank_s_samples(batch, rank_bounds, want):
    from reconstruct.parallel.distributed import Shard
    from reconstruct.methods.samples import local_micro_batches

    shard = Shard(*rank_bounds, 8, ((0, 4), (4, 8)))
    got = local_micro_batches(torch.tensor(batch), shard, micro_batch=2)
    assert [part.tolist() for part in got] == want
