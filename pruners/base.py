"""The contract between the engine and a pruner: make statistics, then prune one weight."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from pruners.masks import check_nm_divisible
from pruners.pattern import SparsityPattern
from pruners.stats import LayerStats


class Pruner(ABC):
    """A mask maker for one ``(out, in)`` linear weight.

    The engine calls :meth:`new_stats` per linear, feeds the layer's inputs to ``add_batch`` from a
    forward hook, optionally all-reduces ``stats.state()``, then calls :meth:`prune`.
    """

    name: ClassVar[str]
    needs_calibration: ClassVar[bool]

    def new_stats(self, in_features: int, device: torch.device | str) -> LayerStats | None:
        """Empty statistics for a linear with ``in_features`` inputs, or None if none are needed."""
        return None

    @property
    def options(self) -> dict[str, int | float]:
        """Options that change the result (for the run manifest's resume check); empty by default."""
        return {}

    @abstractmethod
    def prune(self, weight: Tensor, stats: LayerStats | None, pattern: SparsityPattern) -> tuple[Tensor, Tensor]:
        """Prune one weight matrix.

        Args:
            weight: ``(out, in)`` float32 copy of the weight (Conv1D already transposed); may be
                modified in place.
            stats: the statistics from :meth:`new_stats` after calibration (None for magnitude).
            pattern: the sparsity pattern to meet exactly.

        Returns:
            ``(new_weight, keep_mask)``: ``(out, in)`` float32 with ``new_weight[~keep_mask] == 0``
            exactly, and ``(out, in)`` bool, True = the weight survives.
        """

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"


def prepare_weight(weight: Tensor, pattern: SparsityPattern) -> Tensor:
    """Check a weight's shape against the pattern and return it as float32 (in place when it already is).

    Raises:
        ValueError: a weight that is not 2-D, or an N:M pattern that does not tile its input size.
    """
    if weight.dim() != 2:
        raise ValueError(f"pruners take a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    check_nm_divisible(weight.shape[1], pattern, weight.shape[0])
    return weight.detach().to(torch.float32)


def require_stats(stats: LayerStats | None, kind: type[LayerStats], pruner: str, in_features: int) -> LayerStats:
    """Return ``stats`` after checking it is the right kind, size, and saw calibration tokens."""
    if not isinstance(stats, kind):
        got = type(stats).__name__
        raise ValueError(f"the {pruner} pruner needs {kind.__name__} from its new_stats(), got {got}")
    stats.check_for(in_features, layer_hint=f"{pruner} pruner")
    return stats


def apply_keep_mask(weight: Tensor, keep_mask: Tensor) -> Tensor:
    """Zero the pruned weights in place and return the weight (exact zeros, not small values)."""
    return weight.masked_fill_(~keep_mask, 0.0)
