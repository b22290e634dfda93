"""Layer layout: ``nn.Linear`` stores (out, in), GPT-2's ``Conv1D`` stores (in, out)."""

from __future__ import annotations

from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D


def is_conv1d(module: nn.Module) -> bool:
    """True for GPT-2 style ``Conv1D`` layers, whose weight is stored (in, out)."""
    return isinstance(module, Conv1D)


def weight_as_out_in(module: nn.Module) -> Tensor:
    """The layer's weight viewed as (out, in), whatever its storage layout (a view: no copy)."""
    return module.weight.t() if is_conv1d(module) else module.weight
