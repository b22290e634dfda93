"""The contract between the engine and a pruner: make statistics (or train on the block), then prune.

Two ways a pruner gets its information about a block:

- hook-fed statistics (``needs_calibration``; Wanda, SparseGPT): the engine calls :meth:`Pruner.new_stats`
  per linear and feeds each linear's inputs on the pruned stream to ``add_batch`` from a forward hook;
- block training (``needs_block_training``; LoRAPrune): the engine hands the pruner the block, its
  forward function, the pruned input stream and the dense targets in a :class:`BlockTraining`, and
  :meth:`Pruner.score_block` returns per-linear importance scores, wrapped as :class:`GivenScores`.

Either way the result goes back into :meth:`Pruner.prune` (unstructured / N:M: one linear at a time)
or :meth:`Pruner.importance` (structured patterns: element scores that ``pruners.structured`` sums
over heads or channels).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from pruners.masks import check_nm_divisible
from pruners.pattern import SparsityPattern
from pruners.stats import LayerStats


@dataclass
class BlockTraining:
    """What a block-training pruner (``needs_block_training``) gets from the engine for one block.

    The block is on the compute device with every parameter frozen; earlier pruning (``--cycles``,
    ``--sequential``) is already applied, and ``keep_masks`` says where. The pruner may wrap the
    linears and train, but must leave the block exactly as it found it.
    """

    block: nn.Module  # the transformer block
    linears: dict[str, nn.Module]  # the linears to score, by name relative to the block
    keep_masks: dict[str, Tensor]  # name -> (out, in) bool current keep mask (all True if unpruned)
    forward: Callable[[Tensor], Tensor]  # x (b, T, H) -> block(x) (b, T, H); differentiable
    inputs: Any  # the pruned stream into the block: .n_samples, .read(indices) -> (b, T, H)
    targets: Any  # the dense block's outputs for the same samples, same interface
    seed: int  # per-block (and per-cycle) seed for adapter init and sample order
    micro_batch: int  # samples per forward when only evaluating
    # select_masks(scores, fraction, within) -> {name: (out, in) bool keep mask}: the masks this
    # block's pattern (unstructured, N:M, heads or channels) would choose from ``scores`` at
    # ``fraction`` (0..1) of its sparsity, nested in ``within``: for provisional pruning while training.
    select_masks: Callable[[dict[str, Tensor], float, dict[str, Tensor]], dict[str, Tensor]]
    # train(params, *, steps, lr, batch_size, on_gradients) -> None: the engine's reconstruction trainer
    # on this block's objective (``forward`` on ``inputs`` against ``targets``, AdamW with linear decay,
    # samples drawn from ``seed``); ``on_gradients(step)`` runs after each step's gradients are
    # accumulated, before the optimizer uses them. Pruners get training without importing the engine.
    train: Callable[..., None]


class GivenScores:
    """Per-linear importance computed outside the hooks (by :meth:`Pruner.score_block`).

    Args:
        scores: ``(out, in)`` float32 importance, higher = more important.
    """

    def __init__(self, scores: Tensor) -> None:
        if scores.dim() != 2:
            raise ValueError(f"importance scores must be (out, in), got shape {tuple(scores.shape)}")
        self.scores = scores

    def state(self) -> dict[str, Tensor]:
        """The live tensor (a distributed engine may all-reduce it, summing every rank's importance)."""
        return {"scores": self.scores}


class Pruner(ABC):
    """A mask maker for one ``(out, in)`` linear weight.

    The engine calls :meth:`new_stats` per linear, feeds the layer's inputs to ``add_batch`` from a
    forward hook, optionally all-reduces ``stats.state()``, then calls :meth:`prune`. A pruner with
    ``needs_block_training`` gets no hooks: the engine calls :meth:`score_block` instead and passes
    each linear's scores to :meth:`prune` as :class:`GivenScores`.
    """

    name: ClassVar[str]
    needs_calibration: ClassVar[bool]  # needs hook-fed statistics (new_stats / add_batch)
    needs_block_training: ClassVar[bool] = False  # scores come from score_block(), not from hooks

    def new_stats(self, in_features: int, device: torch.device | str) -> LayerStats | None:
        """Empty statistics for a linear with ``in_features`` inputs, or None if none are needed."""
        return None

    @property
    def options(self) -> dict[str, int | float]:
        """Options that change the result (for the run manifest's resume check); empty by default."""
        return {}

    @abstractmethod
    def prune(
        self, weight: Tensor, stats: LayerStats | None, pattern: SparsityPattern, within: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Prune one weight matrix.

        Args:
            weight: ``(out, in)`` float32 copy of the weight (Conv1D already transposed); may be
                modified in place.
            stats: the statistics from :meth:`new_stats` after calibration (None for magnitude;
                :class:`GivenScores` for block-training pruners).
            pattern: the sparsity pattern to meet exactly (unstructured or N:M).
            within: optional ``(out, in)`` bool keep mask of an earlier pruning cycle; the new keep
                mask must be a subset of it (``select_keep_mask(..., within=)`` guarantees that).

        Returns:
            ``(new_weight, keep_mask)``: ``(out, in)`` float32 with ``new_weight[~keep_mask] == 0``
            exactly, and ``(out, in)`` bool, True = the weight survives.
        """

    @abstractmethod
    def importance(self, weight: Tensor, stats: LayerStats | GivenScores | None) -> Tensor:
        """Element-wise importance of one weight, for structured patterns (no weight update).

        ``pruners.structured`` sums it over the weights of each head or channel.

        Args:
            weight: ``(out, in)`` float32 weight (Conv1D already transposed).
            stats: as for :meth:`prune`.

        Returns:
            ``(out, in)`` float32, >= 0, higher = more important.
        """

    def score_block(self, training: BlockTraining) -> dict[str, Tensor]:
        """Block-training pruners only: train on the block and return ``(out, in)`` scores per linear.

        Args:
            training: the block, its linears, forward function, streams and keep masks.

        Returns:
            ``{name: (out, in) float32 importance}`` for every name in ``training.linears``.
        """
        raise NotImplementedError(f"the {self.name} pruner is scored from hook statistics, not block training")

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
