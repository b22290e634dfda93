"""A block's tensors just before its repair, and which of them the repair changed (``--model-check``).

The model-level check compares the repaired model with the same pruned model without its repairs.
The block loop keeps, per block, only what a revert needs: the tensors whose values the repair
changed (for bias-ln the norms and biases, for MaskLoRA the merged linears), as they were before it,
and zeros for a tensor the repair added (a new bias: zero is no bias). Kept weights are nudged to
stay non-zero in the stored dtype exactly as the repaired ones are, so a revert keeps the pruner's zeros.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pruners.layers import is_conv1d
from reconstruct.modelio.block_io import keep_nonzero_when_stored


class UnrepairedCopy:
    """A CPU copy of every tensor of ``block`` (its ``state_dict``), taken after pruning, before the repair."""

    def __init__(self, block: nn.Module) -> None:
        self.values = {name: value.detach().to("cpu", copy=True) for name, value in block.state_dict().items()}

    def changed(self, block: nn.Module, linears: dict[str, nn.Module], keep_masks: dict[str, Tensor],
                written_dtypes: dict[str, torch.dtype]) -> dict[str, Tensor]:
        """Local name → value before the repair, for each tensor of ``block`` whose value differs now.

        Args:
            block: the block after its repair (merged, and nudged for storage).
            linears: the block's prunable linears by local name.
            keep_masks: linear name → bool (out, in) keep mask.
            written_dtypes: linear name → the dtype its weight is written in.
        """
        result: dict[str, Tensor] = {}
        for name, now in block.state_dict().items():
            before = self.values.get(name)
            if before is None:  # added by the repair (a bias): zeros are the block without it
                result[name] = torch.zeros(now.shape, dtype=now.dtype)
            elif not torch.equal(before, now.detach().cpu()):
                result[name] = before
        for linear, module in linears.items():
            key = f"{linear}.weight"
            if key in result and linear in keep_masks:
                weight = result[key].t() if is_conv1d(module) else result[key]  # (out, in) view
                keep_nonzero_when_stored(weight, keep_masks[linear], written_dtypes.get(linear, weight.dtype))
        return result
