"""Capture the inputs of block 0: hidden states and every keyword argument the model passes.

Only the modules before block 0 run (a pre-hook on block 0 stops the forward). The keyword
arguments (attention mask, position ids, rotary ``position_embeddings``, ...) do not depend on
the token values, only on the batch shape, so one set is kept per micro-batch size.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

# Keyword arguments that belong to generation, not to a single block forward.
DROPPED_KWARGS = ("past_key_value", "past_key_values", "use_cache", "output_attentions", "layer_past")


class _StopForward(Exception):
    """Raised by the capture hook to end the model's forward at block 0."""


@contextmanager
def _capture_hook(block: nn.Module, sink: dict):
    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        sink["hidden"] = hidden.detach()
        sink["kwargs"] = {
            key: value for key, value in kwargs.items() if key not in DROPPED_KWARGS and key != "hidden_states"
        }
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    first_block: nn.Module,
    tokens: torch.Tensor,
    micro_batch: int,
    store: Callable[[slice, torch.Tensor], None],
    device: torch.device,
) -> dict[int, dict]:
    """Run the model up to block 0 on every micro-batch of ``tokens`` and store block-0 inputs.

    Args:
        model: the causal LM; modules before the blocks must be materialised on ``device``.
        first_block: block 0 (may still be on the meta device: it never runs).
        tokens: (n, T) token ids.
        micro_batch: samples per forward.
        store: ``store(sample_slice, hidden)`` receives (b, T, H) hidden states.
        device: where the forward runs.

    Returns:
        ``{batch_size: kwargs}``: block keyword arguments for each micro-batch size seen.
    """
    kwargs_by_size: dict[int, dict] = {}
    for start in range(0, tokens.shape[0], micro_batch):
        batch = tokens[start : start + micro_batch].to(device)  # (b, T)
        sink: dict = {}
        with _capture_hook(first_block, sink):
            try:
                model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
            except _StopForward:
                pass
        if "hidden" not in sink:
            raise RuntimeError("block 0 was never called: the model's forward does not go through its block list")
        store(slice(start, start + batch.shape[0]), sink["hidden"])
        kwargs_by_size.setdefault(batch.shape[0], sink["kwargs"])
    return kwargs_by_size


def block_output(output) -> torch.Tensor:
    """The hidden states a block returns: the tensor itself or the first element of its tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _batch_dim_like(small, large, small_size: int, large_size: int) -> bool:
    return (
        isinstance(small, torch.Tensor)
        and isinstance(large, torch.Tensor)
        and small.dim() > 0
        and small.shape[0] == small_size
        and large.shape[0] == large_size
    )


def _resize(single, reference, reference_size: int, batch_size: int):
    """Expand the batch-1 value to ``batch_size`` wherever the reference shows a batch dimension."""
    if isinstance(single, (tuple, list)):
        return type(single)(_resize(s, r, reference_size, batch_size) for s, r in zip(single, reference))
    if isinstance(single, dict):
        return {key: _resize(single[key], reference[key], reference_size, batch_size) for key in single}
    if _batch_dim_like(single, reference, 1, reference_size):
        return single.expand(batch_size, *single.shape[1:])
    return single


class BlockKwargs:
    """Keyword arguments for a block forward, for any micro-batch size.

    Built from the kwargs captured at batch size 1 and at the working micro-batch size: a tensor
    that has leading size 1 in the first and the micro-batch size in the second carries the batch
    dimension, and is expanded for other sizes.
    """

    def __init__(self, by_size: dict[int, dict]):
        if 1 not in by_size:
            raise ValueError("BlockKwargs needs the kwargs captured at batch size 1")
        self.by_size = dict(by_size)
        larger = [size for size in by_size if size != 1]
        self.reference_size = max(larger) if larger else 1

    def for_batch(self, batch_size: int) -> dict:
        """The kwargs to pass with a (batch_size, T, H) input."""
        if batch_size not in self.by_size:
            self.by_size[batch_size] = _resize(
                self.by_size[1], self.by_size[self.reference_size], self.reference_size, batch_size
            )
        return self.by_size[batch_size]

    def to(self, device: torch.device) -> "BlockKwargs":
        """A copy with every tensor moved to ``device``."""

        def move(value):
            if isinstance(value, torch.Tensor):
                return value.to(device)
            if isinstance(value, (tuple, list)):
                return type(value)(move(v) for v in value)
            if isinstance(value, dict):
                return {k: move(v) for k, v in value.items()}
            return value

        return BlockKwargs({size: move(kwargs) for size, kwargs in self.by_size.items()})
