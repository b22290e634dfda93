"""SparseGPT's Hessian: dead inputs, damping retries that log, and a loud failure (never an identity inverse)."""

from __future__ import annotations

import logging

import pytest
import torch

from pruners import SparsityPattern, get_pruner
from pruners.hessian import MAX_DAMP_RETRIES, damped_inverse_cholesky, hessian_from_sums
from tolerances import gamma, inverse_rtol

ROW50 = SparsityPattern(sparsity=0.5)
TWO_FOUR = SparsityPattern.parse("2:4", None)


def _stats_with_xtx(xtx: torch.Tensor, n_tokens: int):
    """SparseGPT statistics holding a given X^T X (as an all-reduce could leave them)."""
    stats = get_pruner("sparsegpt").new_stats(xtx.shape[0], "cpu")
    stats.state()["xtx"].copy_(xtx)
    stats.state()["n_tokens"].fill_(n_tokens)
    return stats


def _indefinite_xtx(inp=16, dead=(3, 11), off=1.2):
    """H = xtx (n_tokens=2): unit diagonal, one 2x2 block with eigenvalue 1 - off < 0, dead inputs."""
    xtx = torch.eye(inp)
    xtx[0, 1] = xtx[1, 0] = off
    for j in dead:
        xtx[j, j] = 0.0
    return xtx


def test_dead_inputs_get_unit_diagonal_and_zero_columns():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 32, generator=g)  # 16 tokens < 32 features: rank-deficient X^T X
    x[:, [5, 9]] = 0.0  # dead inputs
    H, dead = hessian_from_sums(x.T @ x, 16, torch.device("cpu"))
    assert dead.nonzero().flatten().tolist() == [5, 9]
    assert torch.all(H.diagonal()[dead] == 1.0)

    pruner = get_pruner("sparsegpt", blocksize=8)
    stats = pruner.new_stats(32, "cpu")
    stats.add_batch(x)
    weight = torch.randn(8, 32, generator=g)
    for pattern in (ROW50, TWO_FOUR):
        new_weight, keep = pruner.prune(weight.clone(), stats, pattern)
        assert torch.all(new_weight[:, [5, 9]] == 0)
        assert torch.all(new_weight[~keep] == 0) and torch.isfinite(new_weight).all()
        assert torch.all((~keep).sum(1) == 16)


def test_retry_with_more_damping_logs_and_succeeds(caplog):
    H, _ = hessian_from_sums(_indefinite_xtx(), 2, torch.device("cpu"))  # min eigenvalue -0.2, mean diag 1
    expected = torch.linalg.inv((H + 1.0 * torch.eye(16)).double())  # third try: percdamp 0.01 * 10 * 10
    with caplog.at_level(logging.WARNING, logger="pruners.hessian"):
        U = damped_inverse_cholesky(H.clone(), percdamp=0.01)
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2
    assert all(r.levelno == logging.WARNING for r in retries)
    damped = H + 1.0 * torch.eye(16)  # what the third try factors, in float32
    # U^T U is a float32 Cholesky inverse of it (relative error inverse_rtol) plus one 16-term product
    bound = (inverse_rtol(damped) + gamma(16)) * expected.abs().max()
    torch.testing.assert_close((U.T @ U).double(), expected, rtol=0, atol=float(bound))
    assert torch.equal(U, torch.triu(U))


def test_pruner_survives_ill_conditioned_hessian(caplog):
    stats = _stats_with_xtx(_indefinite_xtx(), 2)
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.WARNING, logger="pruners.hessian"):
        new_weight, keep = get_pruner("sparsegpt").prune(weight.clone(), stats, TWO_FOUR)
    assert any("not positive definite" in r.getMessage() for r in caplog.records)
    assert torch.all(keep.reshape(8, 4, 4).sum(-1) == 2)
    assert torch.all(new_weight[~keep] == 0) and torch.all(new_weight[:, [3, 11]] == 0)
    # The stats are not modified by pruning.
    assert torch.equal(stats.state()["xtx"], _indefinite_xtx())


def test_hopeless_hessian_raises_after_retries(caplog):
    stats = _stats_with_xtx(_indefinite_xtx(off=1e5), 2)  # eigenvalue -1e5: beyond every damping tried
    weight = torch.randn(8, 16)
    with caplog.at_level(logging.WARNING, logger="pruners.hessian"):
        with pytest.raises(RuntimeError, match="not positive definite.*--percdamp"):
            get_pruner("sparsegpt").prune(weight, stats, ROW50)
    assert len([r for r in caplog.records if "retrying" in r.getMessage()]) == MAX_DAMP_RETRIES


def test_non_finite_hessian_raises():
    xtx = torch.eye(8)
    xtx[2, 3] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or inf"):
        get_pruner("sparsegpt").prune(torch.randn(4, 8), _stats_with_xtx(xtx, 4), ROW50)
