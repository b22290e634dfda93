"""Float tolerances derived from error bounds of the computation, not from what one machine printed.

A float sum of ``n`` products, in any order and with or without fused multiply-adds, satisfies
(Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., eq. 3.5)

    |fl(sum x_i y_i) - sum x_i y_i| <= gamma_n * sum |x_i y_i|,   gamma_n = n u / (1 - n u),

with ``u`` the unit roundoff (2**-24 for float32). Kernels that block, vectorise or split the sum
over threads (what ``ATEN_CPU_CAPABILITY`` and the thread count change) only change the order, so
the bound holds on every machine.
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
