"""The loss of a step: summed per-token losses, divided by the step's scored tokens.

Position t predicts token t + 1, so the first token of a window (the BOS when the framing has one) is
never a target; each window of T tokens scores T - 1. Summing over micro-batches and dividing by the
step's total makes the gradient independent of how the step is cut into micro-batches.

The per-token loss is ``--loss``'s (``Objective``): the causal-LM cross-entropy (``lm``), the truncated
KL from the dense teacher's top-k (``kd``, ``distill.py``), or their sum (``lm+kd``: the sum of the two
per-token means, each token weighted alike).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from reconstruct.retrain.distill import TeacherTopK, truncated_kl_sum
from reconstruct.retrain.spec import RetrainSpec


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


@dataclass(frozen=True)
class Objective:
    """The per-token loss a retraining trains and validates with (``RetrainSpec.loss``)."""

    loss: str = "lm"  # lm, kd or lm+kd
    temperature: float = 1.0  # distillation's T (kd, lm+kd)

    @classmethod
    def of(cls, spec: RetrainSpec) -> "Objective":
        """The objective of ``spec``."""
        return cls(spec.loss, spec.kd_temperature)

    def loss_sum(self, logits: torch.Tensor, tokens: torch.Tensor, teacher: TeacherTopK | None) -> torch.Tensor:
        """The summed per-token loss of (b, T) windows: a scalar, in the graph when grad is enabled.

        Args:
            logits: (b, T, V) the student's logits.
            tokens: (b, T) the input ids.
            teacher: the teacher's top-k of these windows (needed unless the loss is ``lm``).
        """
        if self.loss == "lm":
            return token_loss_sum(logits, tokens)  # the arithmetic of every job before --loss
        assert teacher is not None, "a distillation loss needs the teacher's top-k"
        kl = truncated_kl_sum(logits, teacher.to(logits.device), self.temperature)
        return kl if self.loss == "kd" else token_loss_sum(logits, tokens) + kl
