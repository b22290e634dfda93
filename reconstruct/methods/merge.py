"""Folding trained parameters back into plain weights, safely.

The merge runs in two passes so that a bad adapter changes nothing: the first pass computes every
merged tensor and checks that it is finite (peft's ``safe_merge``), the second recomputes it (the
computation is deterministic) and commits it. Memory stays at one merged tensor at a time instead of a
second copy of the block. A last pass checks the invariant the whole project rests on: every pruned
position (keep_mask False) is exactly zero.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pruners.layers import weight_as_out_in
from reconstruct.methods.adapters import LowRankLinear
from reconstruct.methods.bias_norm import MasterParam
from reconstruct.methods.spec import DENSE_MERGE_MESSAGE

logger = logging.getLogger(__name__)


@dataclass
class MergeReport:
    """What a merge did to one block."""

    method: str  # the reconstruction method that was merged
    merged_tensors: list[str] = field(default_factory=list)  # qualified names of the tensors written
    added_biases: list[str] = field(default_factory=list)  # linears that got a new bias (sorted)
    pruned_positions: int = 0  # pruned (keep_mask False) weights over all linears of the block
    densified_positions: int = 0  # of those, how many are non-zero after the merge (lora only)
    densified_fraction: float = 0.0  # densified_positions / pruned_positions (0 when nothing is pruned)


def check_finite(name: str, tensor: Tensor) -> None:
    """Raise RuntimeError naming the tensor if any value is NaN or infinite."""
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise RuntimeError(
            f"reconstruction of {name} produced {bad} non-finite value(s); nothing was merged and the "
            "block's weights are unchanged (the training diverged: lower the reconstruction learning rate)"
        )


@torch.no_grad()
def check_merge(wrappers: dict[str, LowRankLinear], masters: dict[str, MasterParam]) -> None:
    """First pass: every tensor the merge would write is finite, and so is every adapter factor."""
    for name, wrapper in wrappers.items():
        check_finite(f"{name} (lora_A)", wrapper.lora_A)
        check_finite(f"{name} (lora_B)", wrapper.lora_B)
        check_finite(f"{name}.weight", wrapper.merged_weight())
    for name, master in masters.items():
        check_finite(name, master.value())


def count_pruned_nonzero(linear: nn.Module, keep_mask: Tensor) -> tuple[int, int]:
    """(pruned positions, pruned positions that are non-zero) of one layer."""
    pruned = ~keep_mask.to(device=linear.weight.device, dtype=torch.bool)
    nonzero = weight_as_out_in(linear) != 0
    return int(pruned.sum()), int((nonzero & pruned).sum())


def verify_sparsity(linears: dict[str, nn.Module], keep_masks: dict[str, Tensor]) -> None:
    """Raise RuntimeError naming the layer if a pruned weight is non-zero (an internal invariant)."""
    for name, linear in linears.items():
        _, revived = count_pruned_nonzero(linear, keep_masks[name])
        if revived:
            raise RuntimeError(f"{name}: {revived} pruned weight(s) became non-zero during reconstruction")


def dense_merge_allowed(method: str, allow_dense_merge: bool) -> None:
    """Raise the user-facing ValueError for a lora merge the user did not accept."""
    if method == "lora" and not allow_dense_merge:
        raise ValueError(DENSE_MERGE_MESSAGE)


def log_densification(report: MergeReport) -> None:
    if report.densified_positions:
        logger.warning(
            "lora merge filled %d of %d pruned weights (%.1f%%): the block is no longer sparse",
            report.densified_positions,
            report.pruned_positions,
            100.0 * report.densified_fraction,
        )
