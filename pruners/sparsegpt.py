"""SparseGPT (Frantar & Alistarh 2023): blocked OBS pruning with error compensation on kept weights.

Columns are swept left to right in blocks. In each block the mask is chosen adaptively from
``w^2 / d^2`` (``d`` = diagonal of the upper Cholesky factor of ``H^-1``) on the weights as already
updated by earlier blocks; each pruned weight's error is spread onto the not-yet-visited columns.
The counts per block come from :mod:`pruners.masks`, so the final mask meets the pattern exactly.

The Hessian scale differs from the reference (which divides by sequences, not tokens); the damping
is relative and the update uses ratios of ``H^-1`` entries, so the result does not depend on it.

Later cycles of iterative pruning (``--cycles``, ``within`` given) choose the whole layer's mask at
once, nested in the previous one, from the OBS saliency ``w^2 / d^2`` of the weights as they are
(the adaptive per-block choice cannot promise nesting: its per-block counts are not monotone in the
sparsity); the sweep with its error compensation then runs with that fixed mask.

Structured patterns score with the OBS saliency ``w_ij^2 / [H^-1]_jj`` and no weight update
(:meth:`SparseGPTPruner.importance`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from pruners.base import Pruner, apply_keep_mask, prepare_weight, require_stats
from pruners.hessian import damped_inverse_cholesky, hessian_from_sums
from pruners.masks import keep_mask_n_of_m, num_pruned, select_block_keep_mask, select_keep_mask
from pruners.pattern import N_OF_M, SparsityPattern
from pruners.stats import GramStats, LayerStats

DEFAULT_BLOCKSIZE = 128
DEFAULT_PERCDAMP = 0.01


def check_sparsegpt_options(blocksize: int, percdamp: float) -> None:
    """Raise ``ValueError`` naming the flag when a SparseGPT option is out of range."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"--blocksize must be a positive integer, got {blocksize!r}")
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not (0.0 < percdamp < 1e3):
        raise ValueError(f"--percdamp must be a number > 0 (SparseGPT uses 0.01), got {percdamp!r}")


def _nothing_pruned(pattern: SparsityPattern, out_features: int, in_features: int) -> bool:
    if pattern.kind == N_OF_M:
        return False
    count = in_features if pattern.scope == "row" else out_features * in_features
    return num_pruned(count, pattern.sparsity) == 0


def sparsegpt_prune(
    weight: Tensor,
    hinv: Tensor,
    pattern: SparsityPattern,
    blocksize: int = DEFAULT_BLOCKSIZE,
    fixed_keep_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The blocked OBS sweep, given the inverse-Hessian factor.

    Args:
        weight: ``(out, in)`` float32, modified in place (dead input columns already zeroed).
        hinv: ``(in, in)`` upper Cholesky factor of the damped ``H^-1``.
        pattern: the sparsity pattern; for N:M, ``blocksize`` must be a multiple of ``m``.
        blocksize: columns per block.
        fixed_keep_mask: optional ``(out, in)`` bool mask chosen beforehand; the sweep then only
            compensates (no adaptive selection).

    Returns:
        ``(weight, keep_mask)``, both ``(out, in)``; pruned weights are exactly zero.
    """
    out_features, in_features = weight.shape
    fixed = fixed_keep_mask is not None
    nm = pattern.kind == N_OF_M and not fixed
    keep_mask = torch.ones(out_features, in_features, dtype=torch.bool, device=weight.device)  # (out, in)
    for i1 in range(0, in_features, blocksize):
        i2 = min(i1 + blocksize, in_features)
        w1 = weight[:, i1:i2].clone()  # (out, b)
        err1 = torch.zeros_like(w1)  # (out, b)
        hinv1 = hinv[i1:i2, i1:i2]  # (b, b)
        d = hinv1.diagonal()  # (b,)
        if fixed:
            keep1 = fixed_keep_mask[:, i1:i2].to(device=w1.device, dtype=torch.bool)  # (out, b)
        elif nm:
            keep1 = torch.ones_like(w1, dtype=torch.bool)  # (out, b), filled group by group below
        else:
            keep1 = select_block_keep_mask(w1.square() / d.square(), pattern, i1)  # (out, b)
        for i in range(i2 - i1):
            if nm and i % pattern.m == 0:
                group = slice(i, i + pattern.m)
                scores = w1[:, group].square() / d[group].square()  # (out, m)
                keep1[:, group] = keep_mask_n_of_m(scores, pattern.n, pattern.m)
            w = w1[:, i]  # (out,)
            q = w.masked_fill(~keep1[:, i], 0.0)  # (out,)
            err = (w - q) / d[i]  # (out,)
            w1[:, i + 1 :].addr_(err, hinv1[i, i + 1 :], alpha=-1.0)  # (out, b - i - 1)
            w1[:, i] = q
            err1[:, i] = err
        weight[:, i1:i2] = w1
        keep_mask[:, i1:i2] = keep1
        if i2 < in_features:
            weight[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1.0)  # (out, in - i2)
    return apply_keep_mask(weight, keep_mask), keep_mask


class SparseGPTPruner(Pruner):
    """SparseGPT: prunes and updates the kept weights to compensate, from ``X^T X`` statistics.

    Args:
        blocksize: columns per lazy-update block (a multiple of M for N:M patterns).
        percdamp: diagonal damping relative to ``mean(diag H)``.
    """

    name: ClassVar[str] = "sparsegpt"
    needs_calibration: ClassVar[bool] = True

    def __init__(self, blocksize: int = DEFAULT_BLOCKSIZE, percdamp: float = DEFAULT_PERCDAMP) -> None:
        check_sparsegpt_options(blocksize, percdamp)
        self.blocksize = blocksize
        self.percdamp = float(percdamp)

    @property
    def options(self) -> dict[str, int | float]:
        return {"blocksize": self.blocksize, "percdamp": self.percdamp}

    def new_stats(self, in_features: int, device: torch.device | str) -> GramStats:
        """``X^T X`` sums, ``(in, in)`` float32 (plus the token count): ``4 * in^2`` bytes."""
        return GramStats(in_features, device)

    @torch.no_grad()
    def prune(
        self, weight: Tensor, stats: LayerStats | None, pattern: SparsityPattern, within: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Prune ``weight`` with SparseGPT. See :meth:`Pruner.prune` (and the module docstring for ``within``).

        Raises:
            ValueError: N:M with ``blocksize`` not a multiple of ``m``, or unusable statistics.
            RuntimeError: the Hessian stays non-positive-definite after the damping retries.
        """
        w = prepare_weight(weight, pattern)  # (out, in)
        st = require_stats(stats, GramStats, self.name, w.shape[1])
        if pattern.kind == N_OF_M and self.blocksize % pattern.m != 0:
            raise ValueError(
                f"--blocksize {self.blocksize} must be a multiple of M={pattern.m} "
                f"for --pattern {pattern.n}:{pattern.m}"
            )
        if _nothing_pruned(pattern, *w.shape):
            return w, torch.ones_like(w, dtype=torch.bool)
        H, dead = hessian_from_sums(st.xtx, int(st.n_tokens), w.device)  # (in, in), (in,)
        w[:, dead] = 0.0
        hinv = damped_inverse_cholesky(H, self.percdamp)  # (in, in)
        del H
        fixed = None
        if within is not None:
            saliency = w.square() / hinv.diagonal().square().unsqueeze(0)  # (out, in)
            fixed = select_keep_mask(saliency, pattern, within)  # (out, in)
        return sparsegpt_prune(w, hinv, pattern, self.blocksize, fixed)

    @torch.no_grad()
    def importance(self, weight: Tensor, stats: LayerStats | None) -> Tensor:
        """OBS saliency ``w_ij^2 / [H^-1]_jj`` (damped ``H``), ``(out, in)``; dead inputs score 0."""
        w = weight.detach().float().clone()  # (out, in)
        st = require_stats(stats, GramStats, self.name, w.shape[1])
        H, dead = hessian_from_sums(st.xtx, int(st.n_tokens), w.device)  # (in, in), (in,)
        w[:, dead] = 0.0
        hinv = damped_inverse_cholesky(H, self.percdamp)  # (in, in) upper, U^T U = H^-1
        del H
        hinv_diag = hinv.square().sum(dim=0)  # (in,) [H^-1]_jj = sum_k U_kj^2
        return w.square() / hinv_diag.unsqueeze(0)
