"""Calibration statistics: float32 sums, any input shape/dtype, and states that add up across shards."""

from __future__ import annotations

import pytest
import torch

from pruners import LayerStats, SparsityPattern, get_pruner
from pruners.stats import GramStats, SumSquaresStats
from tolerances import assert_within, dot_sum_bound


def _inputs(tokens=256, features=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) * torch.linspace(0.1, 2.0, features)
    return torch.randn(tokens, features, generator=g) @ mix  # (T, in), correlated


def test_sums_match_direct_formulas():
    x = _inputs()
    wanda, gram = SumSquaresStats(32), GramStats(32)
    wanda.add_batch(x)
    gram.add_batch(x)
    x64 = x.double()  # (T, in); products of float32 values are exact in float64
    tokens = x.shape[0]
    # float64 reference: its own rounding is below the float32 bound by 2**-29; count it all the same
    bound_sq = dot_sum_bound((x64**2).sum(0), tokens) + dot_sum_bound((x64**2).sum(0), tokens, torch.float64)
    assert_within(wanda.state()["sum_sq"], (x64**2).sum(0), bound_sq)
    abs_gram = x64.abs().T @ x64.abs()  # (in, in) sum |x_ti x_tj|
    assert_within(gram.state()["xtx"], x64.T @ x64,
                  dot_sum_bound(abs_gram, tokens) + dot_sum_bound(abs_gram, tokens, torch.float64))
    assert int(wanda.state()["n_tokens"]) == int(gram.state()["n_tokens"]) == 256
    assert wanda.state()["n_tokens"].dtype == torch.int64


@pytest.mark.parametrize("stats_cls", [SumSquaresStats, GramStats])
def test_leading_dims_and_dtype(stats_cls):
    x = _inputs(tokens=64, features=16).reshape(4, 16, 16)  # (batch, seq, in)
    flat, shaped, half, rounded = stats_cls(16), stats_cls(16), stats_cls(16), stats_cls(16)
    flat.add_batch(x.reshape(-1, 16))
    shaped.add_batch(x)
    half.add_batch(x.to(torch.bfloat16))  # accumulated in float32 all the same
    rounded.add_batch(x.to(torch.bfloat16).float())
    for key, value in shaped.state().items():
        assert torch.equal(value, flat.state()[key])
        if key != "n_tokens":
            assert value.dtype == torch.float32 and half.state()[key].dtype == torch.float32
            assert torch.equal(half.state()[key], rounded.state()[key])
    assert int(shaped.n_tokens) == 64


@pytest.mark.parametrize("stats_cls", [SumSquaresStats, GramStats])
def test_token_chunking_is_invisible(stats_cls, monkeypatch):
    x = _inputs(tokens=100, features=8)
    whole = stats_cls(8)
    whole.add_batch(x)
    monkeypatch.setattr("pruners.stats.TOKEN_CHUNK", 7)
    chunked = stats_cls(8)
    chunked.add_batch(x)
    x64 = x.double()
    abs_sums = x64.abs().T @ x64.abs() if stats_cls is GramStats else (x64**2).sum(0)
    for key, value in whole.state().items():
        if key == "n_tokens":
            assert torch.equal(chunked.state()[key], value)
        else:  # both within the bound of the exact sum, so within twice it of each other
            assert_within(chunked.state()[key], value, 2 * dot_sum_bound(abs_sums, x.shape[0]))


def test_wrong_feature_count_rejected():
    with pytest.raises(ValueError, match="features"):
        SumSquaresStats(8).add_batch(torch.zeros(3, 9))


@pytest.mark.parametrize("pruner_name", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", [SparsityPattern(sparsity=0.5), SparsityPattern(sparsity=0.7, scope="layer"),
                                     SparsityPattern.parse("2:4", None)], ids=["row50", "layer70", "2:4"])
def test_two_halves_summed_equal_all_tokens(pruner_name, pattern):
    """What an all_reduce(SUM) of two ranks' states produces must prune like one process over all tokens."""
    pruner = get_pruner(pruner_name)
    # small integers (|x| <= 8): every product and partial sum (<= 512 * 64 < 2**24) is exact in float32,
    # so any summation order gives the same bits and the halves must add up exactly
    z = torch.randint(-4, 5, (512, 65), generator=torch.Generator().manual_seed(1)).float()
    x = z[:, 1:] + z[:, :-1]  # (T, in), neighbouring features correlated
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))

    full: LayerStats = pruner.new_stats(64, torch.device("cpu"))
    full.add_batch(x)
    rank0, rank1 = pruner.new_stats(64, "cpu"), pruner.new_stats(64, "cpu")
    rank0.add_batch(x[:256])
    rank1.add_batch(x[256:])
    for key, tensor in rank0.state().items():  # in place, as torch.distributed.all_reduce does
        tensor += rank1.state()[key]
    for key, tensor in full.state().items():
        assert torch.equal(rank0.state()[key], tensor)

    w_full, keep_full = pruner.prune(weight.clone(), full, pattern)
    w_sum, keep_sum = pruner.prune(weight.clone(), rank0, pattern)
    assert torch.equal(keep_full, keep_sum)
    assert torch.equal(w_sum, w_full)  # the same statistics, the same deterministic solve


def test_prune_needs_tokens():
    pruner = get_pruner("wanda")
    with pytest.raises(ValueError, match="no calibration tokens"):
        pruner.prune(torch.randn(4, 8), pruner.new_stats(8, "cpu"), SparsityPattern())
    with pytest.raises(ValueError, match="input features"):
        stats = pruner.new_stats(8, "cpu")
        stats.add_batch(torch.randn(4, 8))
        pruner.prune(torch.randn(4, 16), stats, SparsityPattern())
    with pytest.raises(ValueError, match="needs SumSquaresStats"):
        pruner.prune(torch.randn(4, 8), None, SparsityPattern())
