"""Wanda (Sun et al. 2023): importance ``|W_ij| * ||X_j||_2``, weight times input-feature norm."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from pruners.base import Pruner, apply_keep_mask, prepare_weight, require_stats
from pruners.masks import select_keep_mask
from pruners.pattern import SparsityPattern
from pruners.stats import LayerStats, SumSquaresStats


def wanda_scores(weight: Tensor, sum_sq: Tensor) -> Tensor:
    """Wanda importance.

    Args:
        weight: ``(out, in)`` float32.
        sum_sq: ``(in,)`` sum over calibration tokens of ``x_j^2``.

    Returns:
        ``(out, in)`` scores ``|W_ij| * sqrt(sum_sq_j)``. The Wanda reference divides ``sum_sq`` by
        the sample count first; a positive per-layer factor changes no ranking, so no mask.
    """
    col_norm = sum_sq.to(device=weight.device, dtype=torch.float32).sqrt()  # (in,)
    return weight.abs() * col_norm.unsqueeze(0)  # (out, in)


class WandaPruner(Pruner):
    """Prunes by ``|W| * ||X_j||`` on the calibration inputs of each linear."""

    name: ClassVar[str] = "wanda"
    needs_calibration: ClassVar[bool] = True

    def new_stats(self, in_features: int, device: torch.device | str) -> SumSquaresStats:
        """Per-input-feature sum of squares, ``(in,)`` float32 (plus the token count)."""
        return SumSquaresStats(in_features, device)

    @torch.no_grad()
    def prune(
        self, weight: Tensor, stats: LayerStats | None, pattern: SparsityPattern, within: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Prune ``weight`` with Wanda scores. See :meth:`Pruner.prune`."""
        w = prepare_weight(weight, pattern)  # (out, in)
        st = require_stats(stats, SumSquaresStats, self.name, w.shape[1])
        keep_mask = select_keep_mask(wanda_scores(w, st.sum_sq), pattern, within)  # (out, in)
        return apply_keep_mask(w, keep_mask), keep_mask

    @torch.no_grad()
    def importance(self, weight: Tensor, stats: LayerStats | None) -> Tensor:
        """``|W_ij| * ||X_j||``, ``(out, in)``. See :meth:`Pruner.importance`."""
        w = weight.detach().float()  # (out, in)
        st = require_stats(stats, SumSquaresStats, self.name, w.shape[1])
        return wanda_scores(w, st.sum_sq)
