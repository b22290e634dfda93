"""Every pruner × every pattern: exact counts, exact zeros, and each method's own scoring rule."""

from __future__ import annotations

import pytest
import torch

from pruners import PRUNER_NAMES, get_pruner, select_keep_mask
from tolerances import assert_masks_agree, gamma, inverse_rtol

# Pruners that prune one linear from its weight and hook statistics (LoRAPrune trains on a whole block:
# tests/test_loraprune.py).
LAYER_PRUNERS = tuple(name for name in PRUNER_NAMES if not get_pruner(name).needs_block_training)

from pruner_cases import PATTERNS, mask_group  # noqa: E402  (the shared case table)


def correlated_problem(out=64, inp=128, tokens=512, seed=0):
    """A weight and inputs whose features are correlated and differ in scale (like LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inp, generator=g)  # (out, in)
    spectrum = torch.linspace(1.0, 0.05, inp).unsqueeze(1)  # (in, 1): a few strong directions
    mix = torch.randn(inp, inp, generator=g) * spectrum  # (in, in)
    scale = torch.exp(torch.randn(inp, generator=g))  # per-feature scale, log-normal
    x = (torch.randn(tokens, inp, generator=g) @ mix) * scale  # (T, in)
    return weight, x


def run_pruner(name, weight, x, pattern, **options):
    pruner = get_pruner(name, **options)
    stats = pruner.new_stats(weight.shape[1], torch.device("cpu"))
    if stats is not None:
        stats.add_batch(x)
    return pruner.prune(weight.clone(), stats, pattern)


def sparsegpt_weight_tolerance(weight, x, percdamp=0.01) -> float:
    """First-order error of SparseGPT's float32 weights: kappa(H) * gamma_(3n+1) * the largest row mass.

    Each kept weight receives updates through float32 rows of H^-1 (relative error ``inverse_rtol``, set
    by the damped Hessian's conditioning), and the updates of one row sum to at most its weight mass.
    """
    h = 2 * x.double().T @ x.double() / x.shape[0]  # (in, in), as the pruner builds it
    h += percdamp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    return inverse_rtol(h) * float(weight.double().abs().sum(1).max())


def assert_exact(keep, pattern):
    out, inp = keep.shape
    if pattern.kind == "nm":
        assert torch.all(keep.reshape(out, inp // pattern.m, pattern.m).sum(-1) == pattern.n)
    elif pattern.scope == "row":
        assert torch.all((~keep).sum(1) == int(inp * pattern.sparsity))
    else:
        assert int((~keep).sum()) == int(out * inp * pattern.sparsity)


@pytest.mark.parametrize("shape", [(64, 128), (24, 200)], ids=["64x128", "24x200"])
@pytest.mark.parametrize("pattern_name", list(PATTERNS))
@pytest.mark.parametrize("pruner_name", LAYER_PRUNERS)
def test_exact_pattern_and_zeros(pruner_name, pattern_name, shape):
    pattern = PATTERNS[pattern_name]
    weight, x = correlated_problem(*shape, tokens=256)
    new_weight, keep = run_pruner(pruner_name, weight, x, pattern, blocksize=32)
    assert new_weight.shape == keep.shape == weight.shape
    assert new_weight.dtype == torch.float32 and keep.dtype == torch.bool
    assert_exact(keep, pattern)
    assert torch.all(new_weight[~keep] == 0)
    assert torch.isfinite(new_weight).all()
    if pruner_name != "sparsegpt" or pattern.sparsity == 0.0:  # only SparseGPT updates kept weights
        assert torch.equal(new_weight[keep], weight[keep])


@pytest.mark.parametrize("pattern_name", ["row50", "layer70", "2:4"])
@pytest.mark.parametrize("pruner_name", LAYER_PRUNERS)
def test_deterministic(pruner_name, pattern_name):
    weight, x = correlated_problem(32, 64, tokens=128)
    w1, k1 = run_pruner(pruner_name, weight, x, PATTERNS[pattern_name])
    w2, k2 = run_pruner(pruner_name, weight, x, PATTERNS[pattern_name])
    assert torch.equal(k1, k2) and torch.equal(w1, w2)


@pytest.mark.parametrize("pattern_name", ["row50", "row70", "layer50", "2:4", "1:4"])
def test_magnitude_keeps_largest(pattern_name):
    pattern = PATTERNS[pattern_name]
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    new_weight, keep = get_pruner("magnitude").prune(weight.clone(), None, pattern)
    assert torch.equal(keep, select_keep_mask(weight.abs(), pattern))
    mag = weight.abs()
    if pattern.kind == "nm":
        groups, kgroups = mag.reshape(16, -1, pattern.m), keep.reshape(16, -1, pattern.m)
        assert torch.all(groups.masked_fill(~kgroups, 1e9).amin(-1) >= groups.masked_fill(kgroups, -1).amax(-1))
    elif pattern.scope == "row":
        assert torch.all(mag.masked_fill(~keep, 1e9).amin(1) >= mag.masked_fill(keep, -1).amax(1))
    else:
        assert mag[keep].min() >= mag[~keep].max()


def test_magnitude_needs_no_calibration():
    pruner = get_pruner("magnitude")
    assert pruner.needs_calibration is False
    assert pruner.new_stats(8, torch.device("cpu")) is None
    assert get_pruner("wanda").needs_calibration and get_pruner("sparsegpt").needs_calibration


@pytest.mark.parametrize("pattern_name", ["row50", "row70", "layer50", "2:4", "4:8"])
def test_wanda_matches_direct_formula(pattern_name):
    pattern = PATTERNS[pattern_name]
    weight, x = correlated_problem(32, 64, tokens=200, seed=5)
    _, keep = run_pruner("wanda", weight, x, pattern)
    x64 = x.double()
    scores = weight.double().abs() * x64.pow(2).sum(0).sqrt()  # |W_ij| * ||X_j||_2
    # Wanda's float32 sum of 200 squares (in its own order) is within gamma_200 of the exact one, relatively
    # (positive terms); the square root halves that, the division by the token count and the product with
    # |W| add a rounding each: masks agree up to weights within that of their group's threshold.
    rel_tol = gamma(x.shape[0]) / 2 + gamma(3)
    assert_masks_agree(keep, select_keep_mask(scores, pattern), scores, rel_tol, group=mask_group(pattern))
    # Mean instead of sum (the reference's scaler_row) gives the same mask, up to the same near-ties.
    mean_scores = weight.abs() * x.pow(2).mean(0).sqrt()
    assert_masks_agree(keep, select_keep_mask(mean_scores, pattern), scores, 2 * rel_tol, group=mask_group(pattern))


def test_wanda_follows_input_norms_not_weights():
    """Equal weights, inputs with growing column norms: Wanda prunes the low-norm columns, magnitude can't tell."""
    out, inp = 8, 16
    weight = torch.ones(out, inp)
    x = torch.randn(64, inp, generator=torch.Generator().manual_seed(6)).sign() * torch.arange(1, inp + 1)
    _, keep = run_pruner("wanda", weight, x, PATTERNS["row50"])
    assert torch.equal(keep, (torch.arange(inp) >= inp // 2).expand(out, inp))
    # Big weights on low-norm inputs can still lose against small weights on high-norm inputs.
    weight = torch.cat([torch.full((out, inp // 2), 2.0), torch.full((out, inp // 2), 1.0)], dim=1)
    x = torch.cat([torch.full((64, inp // 2), 0.1), torch.full((64, inp // 2), 1.0)], dim=1)
    _, keep_w = run_pruner("wanda", weight, x, PATTERNS["row50"])
    _, keep_m = run_pruner("magnitude", weight, x, PATTERNS["row50"])
    assert keep_w[:, inp // 2 :].all() and not keep_w[:, : inp // 2].any()
    assert keep_m[:, : inp // 2].all() and not keep_m[:, inp // 2 :].any()


def _recon_error(weight, new_weight, x):
    return torch.linalg.matrix_norm(x @ weight.T - x @ new_weight.T).item()  # ||X W^T - X W'^T||_F


@pytest.mark.parametrize("pattern_name", ["row50", "row70", "layer50", "2:4", "4:8"])
def test_sparsegpt_reconstructs_better(pattern_name):
    pattern = PATTERNS[pattern_name]
    weight, x = correlated_problem(64, 128, tokens=512, seed=7)
    errors = {name: _recon_error(weight, run_pruner(name, weight, x, pattern)[0], x) for name in LAYER_PRUNERS}
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors
    assert errors["sparsegpt"] < 0.95 * errors["wanda"], errors


@pytest.mark.parametrize("blocksize", [1, 16, 48, 128, 1000])
def test_sparsegpt_blocksize_keeps_exact_pattern(blocksize):
    weight, x = correlated_problem(16, 96, tokens=128, seed=8)
    for pattern in (PATTERNS["row70"], PATTERNS["layer50"]):
        new_weight, keep = run_pruner("sparsegpt", weight, x, pattern, blocksize=blocksize)
        assert_exact(keep, pattern)
        assert torch.all(new_weight[~keep] == 0)


def test_sparsegpt_full_block_equals_lazy_blocks():
    """Lazy batched updates are an exact reformulation: blocksize changes rounding, not the result (N:M): the
    same masks but for weights at a near-tie, and the same weights within the rounding bound in the other rows."""
    weight, x = correlated_problem(16, 64, tokens=256, seed=9)
    w_a, k_a = run_pruner("sparsegpt", weight, x, PATTERNS["2:4"], blocksize=8)
    w_b, k_b = run_pruner("sparsegpt", weight, x, PATTERNS["2:4"], blocksize=64)
    _, _, scores, scored = _reference_sparsegpt(weight, x, PATTERNS["2:4"])
    # two summation orders: the masks agree up to near-ties of the (float64) scores
    assert_masks_agree(k_a, k_b, scores, 2 * sparsegpt_score_rtol(weight, x, scored), group=4)
    rows = (k_a == k_b).all(1)  # rows are solved independently: a flip changes only its own row's updates
    w_a, w_b = w_a[rows], w_b[rows]
    # Both orders solve with the same float32 H^-1 rows; each result is within kappa(H) * gamma of the exact
    # update of every kept weight, which is at most the row's whole weight mass (first-order estimate).
    tolerance = 2 * sparsegpt_weight_tolerance(weight, x)
    torch.testing.assert_close(w_a, w_b, rtol=0, atol=tolerance)


def test_sparsegpt_nm_blocksize_must_be_multiple_of_m():
    weight, x = correlated_problem(8, 64, tokens=64)
    with pytest.raises(ValueError, match="--blocksize 6 must be a multiple of M=4"):
        run_pruner("sparsegpt", weight, x, PATTERNS["2:4"], blocksize=6)


@pytest.mark.parametrize("pruner_name", LAYER_PRUNERS)
def test_nm_indivisible_in_features_raises(pruner_name):
    weight, x = correlated_problem(8, 30, tokens=64)
    with pytest.raises(ValueError, match=r"--pattern 2:4.*30 input features"):
        run_pruner(pruner_name, weight, x, PATTERNS["2:4"])


@pytest.mark.parametrize("pruner_name", LAYER_PRUNERS)
def test_accepts_non_float32_weight(pruner_name):
    weight, x = correlated_problem(8, 32, tokens=64)
    new_weight, keep = run_pruner(pruner_name, weight.to(torch.bfloat16), x.to(torch.bfloat16), PATTERNS["2:4"])
    assert new_weight.dtype == torch.float32
    assert torch.all(new_weight[~keep] == 0)


def _reference_sparsegpt(weight, x, pattern, percdamp=0.01):
    """Textbook OBS sweep in float64, one block, inverting H[i:, i:] afresh at every column.

    Returns:
        ``(weight, keep, scores, weights_scored)``: float32 result, mask, the float64 ``w^2 / [H^-1]_ii``
        each mask was chosen from and the weights those scores were computed from (updated ones for N:M).
    """
    w = weight.double().clone()  # (out, in)
    out, inp = w.shape
    h = 2 * x.double().T @ x.double() / x.shape[0]  # (in, in)
    h += percdamp * h.diagonal().mean() * torch.eye(inp, dtype=torch.float64)
    inv_tail = [torch.linalg.inv(h[i:, i:]) for i in range(inp)]  # H_F^-1 for F = columns i..
    d2 = torch.stack([inv_tail[i][0, 0] for i in range(inp)])  # (in,)
    scored = w.clone()  # (out, in): the weights each score saw
    if pattern.kind == "nm":
        keep = torch.ones(out, inp, dtype=torch.bool)
    else:
        keep = select_keep_mask(w**2 / d2, pattern)
    for i in range(inp):
        if pattern.kind == "nm" and i % pattern.m == 0:
            g = slice(i, i + pattern.m)
            scored[:, g] = w[:, g]
            keep[:, g] = select_keep_mask(w[:, g] ** 2 / d2[g], pattern)
        q = w[:, i] * keep[:, i]
        err = (w[:, i] - q) / inv_tail[i][0, 0]  # (out,)
        w[:, i:] -= err.unsqueeze(1) * inv_tail[i][0].unsqueeze(0)
        w[:, i] = q
    return w.float(), keep, scored**2 / d2, scored


def sparsegpt_score_rtol(weight, x, scored) -> torch.Tensor:
    """Relative error of SparseGPT's float32 scores ``w^2 / [H^-1]_ii``, elementwise.

    ``[H^-1]_ii`` comes from a float32 Cholesky inverse (``inverse_rtol``); the weights scored carry the
    OBS updates of earlier columns (N:M), each within ``sparsegpt_weight_tolerance`` absolutely, which
    moves ``w^2`` by twice that relative to ``|w|``; squaring and dividing add a rounding each.
    """
    h = 2 * x.double().T @ x.double() / x.shape[0]
    h += 0.01 * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    return 2 * sparsegpt_weight_tolerance(weight, x) / scored.abs() + 2 * inverse_rtol(h) + gamma(4)


@pytest.mark.parametrize("pattern_name", ["row50", "layer70", "2:4", "1:4"])
def test_sparsegpt_matches_textbook_obs(pattern_name):
    """Cholesky rows of H^-1 and lazy block updates reproduce the explicit per-column OBS solution."""
    pattern = PATTERNS[pattern_name]
    weight, x = correlated_problem(16, 32, tokens=256, seed=10)
    blocksize = 32 if pattern.kind != "nm" else 8  # N:M masks do not depend on the block size
    new_weight, keep = run_pruner("sparsegpt", weight, x, pattern, blocksize=blocksize)
    ref_weight, ref_keep, scores, scored = _reference_sparsegpt(weight, x, pattern)
    # float32 against float64: the masks agree up to near-ties of the float64 scores
    assert_masks_agree(keep, ref_keep, scores, sparsegpt_score_rtol(weight, x, scored), group=mask_group(pattern))
    rows = (keep == ref_keep).all(1)  # rows are solved independently: a flip changes only its own row's updates
    new_weight, ref_weight = new_weight[rows], ref_weight[rows]
    torch.testing.assert_close(new_weight.double(), ref_weight.double(), rtol=0, atol=sparsegpt_weight_tolerance(weight, x))
