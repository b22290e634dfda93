"""The causal-LM loss of a step: summed token cross-entropy, divided by the step's scored tokens.

Position t predicts token t + 1, so the first token of a window (the BOS when the framing has one) is
never a target; each window of T tokens scores T - 1. Summing over micro-batches and dividing by the
step's total makes the gradient independent of how the step is cut into micro-batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def scored_tokens(tokens: torch.Tensor) -> int:
    """Targets in a (n, T) batch of windows: n (T - 1)."""
    return tokens.shape[0] * (tokens.shape[1] - 1)


def token_loss_sum(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy, computed in float32 at least (float64 logits stay float64); a scalar.

    Args:
        logits: (b, T, V) the model's logits.
        tokens: (b, T) the input ids (targets are ``tokens[:, 1:]``).
    """
    predicted = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))  # (b, T-1, V)
    targets = tokens[:, 1:].to(logits.device)  # (b, T-1)
    return F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1), reduction="sum")
