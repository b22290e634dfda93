"""Float tolerances derived from error bounds of the computation, not from what one machine printed.

A float sum of ``n`` products, in any order and with or without fused multiply-adds, satisfies
(Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., eq. 3.5)

    |fl(sum x_i y_i) - sum x_i y_i| <= gamma_n * sum |x_i y_i|,   gamma_n = n u / (1 - n u),

with ``u`` the unit roundoff (2**-24 for float32). Kernels that block, vectorise or split the sum
over threads (what ``ATEN_CPU_CAPABILITY`` and the thread count change) only change the order, so
the bound holds on every machine.

The rule for every comparison in the suite:

- **Exact** (``torch.equal``, ``==`` on floats, equal bytes) only where the arithmetic guarantees the
  same bits, for one of three reasons, said in a comment next to the assertion:
  *integers*: integer-valued data small enough that every product and partial sum is exact in the
  dtype, so any order gives the same bits;
  *same order*: both sides make the same kernel calls on the same shapes and dtypes, one torch thread
  each (``conftest`` sets it), e.g. a rerun or a resume, a rank whose slice is exactly one
  single-process micro-batch, a sum of two terms (float addition is commutative);
  *no arithmetic*: copies, masks applied, bytes moved.
- **Bounded** everywhere else: another process count, micro-batch split, kernel, dtype or a reference
  written another way changes the summation order, so values are compared with :func:`assert_within`
  and a bound from the data (:func:`dot_sum_bound`, :func:`linear_bound`, :func:`inverse_rtol`), and
  keep masks chosen from such scores with :func:`assert_masks_agree` (the same count in every group,
  flips only at near-ties of the score).
"""

from __future__ import annotations

import torch
from torch import Tensor


def gamma(n_terms: int, dtype: torch.dtype = torch.float32) -> float:
    """``gamma_n = n u / (1 - n u)`` for ``dtype``'s unit roundoff ``u`` (half its machine epsilon)."""
    u = torch.finfo(dtype).eps / 2
    if n_terms * u >= 1:
        raise ValueError(f"{n_terms} terms: the bound needs n u < 1")
    return n_terms * u / (1 - n_terms * u)


def dot_sum_bound(abs_products_sum: Tensor, n_terms: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Bound on the rounding error of sums of ``n_terms`` products, elementwise.

    Args:
        abs_products_sum: ``sum |x_i y_i|`` of each sum, in float64 (e.g. ``|X|^T |X|`` for ``X^T X``).
        n_terms: products per sum.
        dtype: the precision the sums were computed in.
    """
    return gamma(n_terms, dtype) * abs_products_sum


def assert_within(actual: Tensor, expected: Tensor, bound: Tensor | float) -> None:
    """Assert ``|actual - expected| <= bound`` elementwise (compared in float64), naming the worst element."""
    error = (actual.detach().double() - expected.detach().double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64).detach()
    excess = error - bound
    worst = int(excess.argmax())
    assert float(excess.reshape(-1)[worst]) <= 0, (
        f"element {worst}: error {float(error.reshape(-1)[worst]):.3g} exceeds its bound "
        f"{float(bound.expand_as(error).reshape(-1)[worst]):.3g}"
    )


def linear_bound(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Rounding bound of one float32 evaluation of ``x @ weight.T + bias``, elementwise, float64.

    Each output is a sum of ``in_features`` products plus the bias (one more term, a product with 1),
    so it lies within ``gamma_(in+1) (|x| |W|^T + |b|)`` of the exact value in any summation order.

    Args:
        x: inputs (..., in).
        weight: (out, in).
        bias: (out,) or None.
    """
    abs_sum = x.detach().double().abs() @ weight.detach().double().abs().T  # (..., out)
    if bias is not None:
        abs_sum = abs_sum + bias.detach().double().abs()
    return dot_sum_bound(abs_sum, weight.shape[1] + (bias is not None))


def inverse_rtol(matrix: Tensor, dtype: torch.dtype = torch.float32) -> float:
    """Relative forward error of a Cholesky inverse or solve of a symmetric positive definite ``matrix``.

    A backward-stable Cholesky solve in ``dtype`` perturbs the matrix by at most ``gamma_(3n+1)``
    relatively (Higham, Theorem 10.4), which moves the solution by at most ``kappa_2 * gamma_(3n+1)``
    to first order: the error is governed by the conditioning of the matrix, not by one machine.

    Args:
        matrix: ``(n, n)`` the matrix as the code under test received it (its condition is computed in float64).
        dtype: the precision of the computation under test.
    """
    n = matrix.shape[0]
    return float(torch.linalg.cond(matrix.double())) * gamma(3 * n + 1, dtype)


def assert_masks_agree(keep: Tensor, expected: Tensor, scores: Tensor, rel_tol: float, *,
                       group: str | int = "row", max_flip_fraction: float = 0.01) -> None:
    """Assert two keep masks chosen from scores computed in different orders agree up to near-ties.

    Both masks meet the same pattern, so every group keeps as many weights in both; a weight may change
    sides only where rounding can reorder it against its group's threshold, i.e. where its score lies
    within ``rel_tol`` (relative) of the boundary between ``expected``'s kept and pruned scores.

    Args:
        keep: ``(out, in)`` bool mask under test.
        expected: ``(out, in)`` bool reference mask.
        scores: ``(out, in)`` the reference's scores (higher = kept), any float dtype.
        rel_tol: relative error the two computations' scores may have (from the data, e.g. ``gamma``).
        group: where the pattern counts: ``"row"``, ``"layer"``, or ``m`` of N:M (groups of m along in).
        max_flip_fraction: the share of weights allowed to differ at all.
    """
    def grouped(t: Tensor) -> Tensor:
        if group == "row":
            return t.reshape(t.shape[0], -1)  # (out, in)
        if group == "layer":
            return t.reshape(1, -1)  # (1, out * in)
        return t.reshape(-1, int(group))  # (out * in / m, m)

    keep, expected, scores = grouped(keep), grouped(expected), grouped(scores.detach().double())
    assert torch.equal(keep.sum(-1), expected.sum(-1)), "the masks keep different counts in some group"
    flips = keep != expected
    fraction = float(flips.double().mean())
    assert fraction <= max_flip_fraction, f"{fraction:.2%} of the weights flip (at most {max_flip_fraction:.2%})"
    if not flips.any():
        return
    lowest_kept = scores.masked_fill(~expected, float("inf")).amin(-1, keepdim=True)  # (G, 1)
    highest_pruned = scores.masked_fill(expected, float("-inf")).amax(-1, keepdim=True)
    boundary = (lowest_kept + highest_pruned) / 2  # a group with a flip has both kept and pruned weights
    distance = (scores - boundary).abs()
    allowed = rel_tol * (scores.abs() + boundary.abs())
    far = flips & (distance > allowed)
    assert not far.any(), (
        f"{int(far.sum())} flipped weight(s) are not near a tie: score {float(scores[far][0]):.6g}, "
        f"boundary {float(boundary.expand_as(scores)[far][0]):.6g}, allowed distance {float(allowed[far][0]):.3g}"
    )


# How much a block may amplify a relative rounding error of its input (norms divide by an RMS that may be
# small, softmax exponentiates). An allowance, not a measurement: 10^4 per model, far above what the tiny
# random models of the tests do, and still harmless at float64, where it leaves the bound near 1e-9 of
# the values' scale while a modelling error (a wrong mask or rotary table) moves them by more than 1e-2.
BLOCK_AMPLIFICATION = 1e4


def forward_bound(reference: Tensor, config, dtype: torch.dtype = torch.float64) -> Tensor:
    """Bound on the difference of two evaluations of a model's forward that differ only in summation order.

    Every value is built from sums of at most ``hidden + intermediate`` terms per block (the attention's
    sums over positions are shorter in the tests), ``depth`` blocks deep (plus the head), each sum within
    ``gamma_K`` of exact relative to its terms' magnitude; :data:`BLOCK_AMPLIFICATION` covers how the
    nonlinear parts carry that on. Both evaluations lie within the bound of the exact value, so their
    difference within twice it.

    Args:
        reference: one evaluation (e.g. logits); the bound scales with its largest magnitude (at least 1).
        config: the model's transformers config (depth and widths).
        dtype: the precision of both evaluations.
    """
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
    intermediate = int(getattr(config, "intermediate_size", 0) or getattr(config, "ffn_dim", 0)
                       or getattr(config, "n_inner", 0) or 4 * hidden)
    depth = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0)) + 1
    scale = max(1.0, float(reference.detach().abs().max()))
    return torch.full_like(reference, 2 * depth * gamma(hidden + intermediate, dtype) * BLOCK_AMPLIFICATION * scale,
                           dtype=torch.float64)
