"""Extension points of the trainer, for callers that build on it (LoRAPrune's global stage, say).

A caller passes an object with any of these methods; ``NoHooks`` supplies no-op defaults, so a caller
subclasses it and overrides what it needs.
"""

from __future__ import annotations

from typing import Protocol

from torch import nn


class RetrainHooks(Protocol):
    """What the trainer calls, and when."""

    def block_loaded(self, index: int, block: nn.Module) -> None:
        """Block ``index`` has its weights materialised and its trainables attached.

        Called on every load: in both the forward and the backward pass of every streamed step (and of
        every held-out evaluation), once per block in the resident path, and once more when the block
        is merged and written. A caller may change frozen weights in place here (apply a mask, say);
        the change lasts until the block is released, and is what gets written.
        """

    def block_gradients_ready(self, index: int, block: nn.Module) -> None:
        """The step's backward through block ``index`` is complete: its trainables' ``.grad`` hold the
        whole step's gradient (after any all-reduce across ranks)."""

    def step_done(self, step: int) -> None:
        """Optimizer step ``step`` (counted from 1) has been applied."""


class NoHooks:
    """The default hooks: do nothing."""

    def block_loaded(self, index: int, block: nn.Module) -> None:
        """No-op."""

    def block_gradients_ready(self, index: int, block: nn.Module) -> None:
        """No-op."""

    def step_done(self, step: int) -> None:
        """No-op."""
