"""Magnitude pruning: drop the weights with the smallest absolute value; no calibration."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from pruners.base import Pruner, apply_keep_mask, prepare_weight
from pruners.masks import select_keep_mask
from pruners.pattern import SparsityPattern
from pruners.stats import LayerStats


def magnitude_scores(weight: Tensor) -> Tensor:
    """Importance ``|W|``: ``(out, in)`` in, ``(out, in)`` out."""
    return weight.abs()


class MagnitudePruner(Pruner):
    """Keeps the largest ``|W|`` under the pattern; ignores calibration data."""

    name: ClassVar[str] = "magnitude"
    needs_calibration: ClassVar[bool] = False

    @torch.no_grad()
    def prune(
        self, weight: Tensor, stats: LayerStats | None, pattern: SparsityPattern, within: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Prune ``weight`` by magnitude; ``stats`` is ignored. See :meth:`Pruner.prune`."""
        w = prepare_weight(weight, pattern)  # (out, in)
        keep_mask = select_keep_mask(magnitude_scores(w), pattern, within)  # (out, in)
        return apply_keep_mask(w, keep_mask), keep_mask

    @torch.no_grad()
    def importance(self, weight: Tensor, stats: LayerStats | None) -> Tensor:
        """``|W|``, ``(out, in)``. See :meth:`Pruner.importance`."""
        return magnitude_scores(weight.detach().float())
