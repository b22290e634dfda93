"""One block's state while the pipeline works on it: what every step of the block loop reads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from calib.activations import ActivationStream
from pruners.pattern import SparsityPattern

from reconstruct.loop.block_report import BlockReport


@dataclass
class BlockContext:
    """The block being pruned and repaired, its streams and what has happened to it so far.

    Built once per block by ``BlockPipeline.process``; each step (statistics, prune, reconstruct)
    takes it instead of a long argument list. The choice between the dense stream and a dense
    block copy is made here, once: :attr:`targets` and :attr:`objective` say what the whole block's
    output is compared with, whichever it is.
    """

    index: int  # the block's position in the model (0-based): seeds and crash points
    block: nn.Module  # the transformer block, pruned in place
    linears: dict[str, nn.Module]  # its prunable linears, by name relative to the block
    sparse: ActivationStream  # the pruned model's inputs to this block
    dense: ActivationStream | None  # the dense model's inputs (None: a plain prune carries no dense stream)
    report: BlockReport  # what happened, filled in step by step
    forward: Callable[[Tensor], Tensor]  # x (b, T, H) -> block(x) (b, T, H)
    run: Callable[[nn.Module, Tensor], Tensor]  # (module, x (b, T, H)) -> (b, T, H) with this block's arguments
    # A copy of the dense block when the objective needs the dense block's inputs during training
    # (unit granularity, local targets); the dense stream then advances only after the block.
    dense_copy: nn.Module | None = None
    # The whole-block objective: ``objective(x)`` on the pruned stream against ``targets.read(rows)``,
    # the dense block's outputs (the dense stream already advanced, or the dense copy on it).
    objective: Callable[[Tensor], Tensor] | None = None
    targets: Any = None  # .n_samples, .read(indices) -> (b, T, H); None without a dense stream
    keep_masks: dict[str, Tensor] = field(default_factory=dict)  # name -> (out, in) bool, True = kept
    cycle: int = 1  # --cycles: the prune -> reconstruct step (1-based)
    pattern: SparsityPattern | None = None  # the block's target pattern (its --allocation sparsity)
