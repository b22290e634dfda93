"""SparseGPT's Hessian ``H = 2 X^T X / n`` and the Cholesky factor of its damped inverse."""

from __future__ import annotations

import logging

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# After the first damping fails, retry this many times, each with DAMP_RETRY_FACTOR times more.
MAX_DAMP_RETRIES = 4
DAMP_RETRY_FACTOR = 10.0


def hessian_from_sums(xtx: Tensor, n_tokens: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Build ``H = 2 * xtx / n_tokens`` in float32 and repair dead inputs.

    Args:
        xtx: ``(in, in)`` sum over tokens of ``x x^T`` (left untouched).
        n_tokens: number of tokens summed, > 0.
        device: where ``H`` is built (the weight's device).

    Returns:
        ``(H, dead)``: ``(in, in)`` float32 new tensor with ``H_ii = 1`` where ``H_ii`` was 0, and the
        ``(in,)`` bool mask of those dead inputs (their weight columns should be zeroed).

    Raises:
        RuntimeError: ``xtx`` holds NaN or inf (no damping can repair that).
    """
    H = xtx.to(device=device, dtype=torch.float32) * (2.0 / n_tokens)  # (in, in), a new tensor
    if not torch.isfinite(H).all():
        raise RuntimeError("SparseGPT: the input Hessian X^T X holds NaN or inf; the layer's inputs are not finite")
    diag = H.diagonal()  # (in,) view
    dead = diag == 0  # (in,)
    diag[dead] = 1.0
    return H, dead


def damped_inverse_cholesky(H: Tensor, percdamp: float, max_retries: int = MAX_DAMP_RETRIES) -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * I)^-1`` with ``U^T U = (H + damp I)^-1``.

    ``damp = percdamp * mean(diag H)``. When a factorization fails (H not numerically positive
    definite), the damping is multiplied by ``DAMP_RETRY_FACTOR`` and the solve retried, with a
    warning each time; there is never a silent fallback to an identity inverse.

    Args:
        H: ``(in, in)`` float32 symmetric; modified in place (the damping is added to its diagonal).
        percdamp: relative damping, > 0.
        max_retries: retries after the first attempt.

    Returns:
        ``(in, in)`` float32 upper-triangular factor.

    Raises:
        RuntimeError: still not positive definite after ``max_retries`` retries.
    """
    diag = H.diagonal()  # (in,) view
    mean_diag = diag.mean()
    applied = torch.zeros((), dtype=H.dtype, device=H.device)
    rel = percdamp
    for attempt in range(max_retries + 1):
        damp = rel * mean_diag
        diag.add_(damp - applied)
        applied = damp
        U = _inverse_cholesky_or_none(H)
        if U is not None:
            return U
        if attempt < max_retries:
            log.warning(
                "SparseGPT: Hessian not positive definite with damping %.3g (percdamp %.3g); retrying with "
                "percdamp %.3g",
                float(damp), rel, rel * DAMP_RETRY_FACTOR,
            )
        rel *= DAMP_RETRY_FACTOR
    raise RuntimeError(
        f"SparseGPT: the layer's Hessian is not positive definite even with percdamp "
        f"{rel / DAMP_RETRY_FACTOR:.3g} after {max_retries} retries; use more calibration samples or a "
        "larger --percdamp"
    )


def _inverse_cholesky_or_none(H: Tensor) -> Tensor | None:
    """Upper Cholesky factor of ``H^-1`` (``(in, in)``), or None when a factorization fails."""
    L, info = torch.linalg.cholesky_ex(H)  # (in, in) lower
    if int(info) != 0:
        return None
    hinv = torch.cholesky_inverse(L)  # (in, in)
    del L
    U, info = torch.linalg.cholesky_ex(hinv, upper=True)  # (in, in) upper
    del hinv
    if int(info) != 0 or not bool(torch.isfinite(U).all()):
        return None
    return U
