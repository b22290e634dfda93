"""The block error: a block's outputs against its targets, measured without gradients.

One arithmetic for every measurement of the block loop (the error before and after a repair, on the
calibration rows and on held-out rows), so a report's before and after are comparable to the last bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from reconstruct.methods.loss import error_terms
from reconstruct.parallel import distributed


class ActivationStream(Protocol):
    """What the engine's activation caches provide."""

    n_samples: int

    def read(self, indices: Tensor | slice) -> Tensor:  # (b, T, H) on the compute device
        ...


def block_output(out: Tensor | tuple) -> Tensor:
    """The hidden states of a block's output (blocks that return a tuple put them first)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def sum_of_squares(values: Tensor) -> float:
    """``Σ values²`` over every element: float32 squares summed in float64.

    The one arithmetic of the block MSE: :func:`evaluate_mse` (the error before reconstruction and
    on the held-out samples) and the engine's propagation pass (the error after) both use it, so a
    report's before and after are comparable to the last bit.
    """
    return float(torch.sum(values.float() ** 2, dtype=torch.float64))


@torch.no_grad()
def evaluate_error(
    forward: Callable[[Tensor], Tensor], inputs: ActivationStream, targets: ActivationStream, micro_batch: int,
    rows: Tensor | None = None, loss: str = "mse",
) -> float:
    """Reconstruction error (``loss``, :mod:`reconstruct.methods.loss`) of ``forward(inputs)`` against ``targets``.

    Args:
        forward: runs the block on (b, T, H) and returns (b, T, H).
        inputs: the block's input stream.
        targets: the stream to match (same n_samples).
        micro_batch: samples per forward.
        rows: only these rows of this rank's streams (sorted; may be empty); None = all.
        loss: ``mse`` (the float32 squares summed in float64, as :func:`sum_of_squares`) or ``token-relative``.

    Returns:
        The mean of the loss's terms over every sample (of every rank's samples in a distributed run).
    """
    n = inputs.n_samples
    if targets.n_samples != n:
        raise ValueError(f"inputs have {n} samples but targets have {targets.n_samples}")
    total, count = 0.0, 0
    parts = ([slice(start, min(start + micro_batch, n)) for start in range(0, n, micro_batch)] if rows is None
             else list(rows.split(micro_batch)))
    for part in parts:
        if isinstance(part, Tensor) and part.numel() == 0:
            continue
        out = block_output(forward(inputs.read(part))).float()
        terms = error_terms(out, targets.read(part).float(), loss)  # (b, T, H) or (b, T)
        total += float(torch.sum(terms, dtype=torch.float64))
        count += terms.numel()
    total, count = distributed.all_reduce_sum(total, count)
    return total / max(count, 1)


def evaluate_mse(
    forward: Callable[[Tensor], Tensor], inputs: ActivationStream, targets: ActivationStream, micro_batch: int,
    rows: Tensor | None = None,
) -> float:
    """Mean squared error between ``forward(inputs)`` and ``targets``: :func:`evaluate_error` with ``mse``."""
    return evaluate_error(forward, inputs, targets, micro_batch, rows=rows)
