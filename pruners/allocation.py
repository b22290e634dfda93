"""Per-block sparsity allocation: OWL (outlier-weighed layerwise sparsity) and its outlier statistic.

OWL (Yin et al., ICML 2024; luuyin/OWL ``lib/prune_all.py``) gives blocks whose Wanda scores hold
more outliers a lower sparsity. Its code takes the outlier ratio ``D_i`` of every block, min-max
normalises it to ``[0, 2λ]``, shifts it so the plain mean over blocks is ``1 - S`` and uses the result
as the block's density. Where this module deviates:

- The mean is weighted by each block's prunable parameter count, so the share of pruned weights of
  the whole model is the target ``S`` even when blocks differ in size.
- Every block stays within ``[S - λ, S + λ]`` (clipped to ``[0, 1)``). OWL's shift alone can push a
  block up to ``2λ`` from the target (one outlier-heavy block among many plain ones); here the shift
  ``c`` is the exact solution of ``Σ n_i clip(1 - S + u_i - c) = (1 - S) Σ n_i``, found by bisection
  (the left side is continuous and monotone in ``c``): what a clipped block cannot take moves
  to the others through the common shift.
- Equal outlier ratios in every block (OWL divides by zero) give the uniform allocation.

Rounding: pruners remove ``int(in · s_i)`` weights per row (``pruners.masks``), so a block's achieved
sparsity is below ``s_i`` by less than one weight per row, and the achieved weighted mean is below
``S`` by less than one weight per row of every pruned linear.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

OWL_M = 5.0  # default outlier threshold: a score is an outlier above M x the block's mean score
OWL_LAMBDA = 0.08  # default largest deviation of a block's sparsity from the target
_BISECTION_STEPS = 200  # halvings of the shift's bracket: far below float64 resolution


def outlier_ratio(scores: Iterable[Tensor], m: float = OWL_M) -> float:
    """OWL's outlier ratio of a block: the share of its pooled scores above ``m`` times their mean.

    Two passes over ``scores`` (a re-iterable collection, one tensor per linear, any shape, which
    may build each tensor when asked), so no pooled copy of the block's scores is needed.

    Args:
        scores: the Wanda scores ``|W| · ‖X‖₂`` of every prunable linear of the block.
        m: the outlier threshold M (OWL's ``Hyper_m``).

    Returns:
        The fraction in [0, 1] of all scores strictly above ``m × mean``.
    """
    total = sum(float(s.double().sum()) for s in scores)
    count = sum(s.numel() for s in scores)
    if count == 0:
        raise ValueError("outlier_ratio needs at least one score")
    threshold = m * total / count
    return sum(int((s.double() > threshold).sum()) for s in scores) / count


def _weighted_density(shifted: Tensor, weights: Tensor, low: float, high: float) -> float:
    """Weighted mean of ``shifted`` clipped to [low, high]."""
    return float((shifted.clamp(low, high) * weights).sum() / weights.sum())


def owl_sparsities(
    outlier_ratios: Sequence[float], param_counts: Sequence[int], target: float, lam: float = OWL_LAMBDA,
) -> list[float]:
    """Per-block sparsities from the blocks' outlier ratios (see the module docstring).

    Args:
        outlier_ratios: ``D_i`` of every block (:func:`outlier_ratio`).
        param_counts: prunable weights of every block, the weights of the mean.
        target: the mean sparsity ``S`` in [0, 1).
        lam: the largest deviation λ >= 0 of a block from ``S``.

    Returns:
        Sparsities ``s_i`` in ``[max(S - λ, 0), min(S + λ, 1))`` whose mean weighted by
        ``param_counts`` is ``S`` (to float64 rounding); more outliers, lower sparsity.

    Raises:
        ValueError: on mismatched lengths, an empty model, or values out of range.
    """
    if len(outlier_ratios) != len(param_counts) or not outlier_ratios:
        raise ValueError("owl_sparsities needs one outlier ratio and one parameter count per block")
    if not 0.0 <= target < 1.0:
        raise ValueError(f"--sparsity must be in [0, 1), got {target}")
    if lam < 0:
        raise ValueError(f"--owl-lambda must be >= 0, got {lam}")
    ratios = torch.tensor(outlier_ratios, dtype=torch.float64)  # (blocks,)
    weights = torch.tensor(param_counts, dtype=torch.float64)  # (blocks,)
    if bool((weights <= 0).any()):
        raise ValueError("every block needs a positive count of prunable weights")
    spread = float(ratios.max() - ratios.min())
    if spread == 0.0 or lam == 0.0:
        return [float(target)] * len(outlier_ratios)
    raised = (ratios - ratios.min()) / spread * (2 * lam)  # (blocks,) in [0, 2λ]
    density = 1.0 - target
    low, high = density - lam, density + lam  # densities allowed
    low = max(low, 1.0 - min(target + lam, 1.0 - 1e-9))  # sparsity stays below 1
    high = min(high, 1.0)  # sparsity stays >= 0
    # shifted(c) = density + raised - c; its clipped weighted mean falls as c grows: bisect for == density.
    below, above = -2 * lam - 1.0, 2 * lam + 1.0  # at `below` every block is at `high`, at `above` at `low`
    for _ in range(_BISECTION_STEPS):
        middle = 0.5 * (below + above)
        if _weighted_density(density + raised - middle, weights, low, high) > density:
            below = middle
        else:
            above = middle
    densities = (density + raised - 0.5 * (below + above)).clamp(low, high)  # (blocks,)
    return [float(1.0 - d) for d in densities]


def weighted_mean(values: Sequence[float], weights: Sequence[int]) -> float:
    """``Σ w_i v_i / Σ w_i``: a model's sparsity from its blocks' sparsities and sizes."""
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


def check_explicit_sparsities(values: Sequence[float], n_blocks: int, source: str) -> list[float]:
    """Validate an explicit per-block allocation: one value per block, each in [0, 1).

    Args:
        values: the sparsities read from the file.
        n_blocks: blocks of the model.
        source: the file's name, for the message.

    Raises:
        ValueError: one line naming ``--allocation`` and what is allowed.
    """
    if len(values) != n_blocks:
        raise ValueError(f"--allocation {source}: {len(values)} sparsities for a model of {n_blocks} blocks; "
                         f"give exactly one per block")
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"--allocation {source}: block {index + 1}'s sparsity {value!r} is not a number "
                             f"in [0, 1)")
    return [float(v) for v in values]
