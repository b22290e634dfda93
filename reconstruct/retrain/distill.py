"""Distillation's tensor math: the teacher's top-k next-token distribution and the truncated KL.

Per scored token (position t predicts token t + 1, as in ``loss.py``) the teacher's distribution at
temperature T, ``p = softmax(z_teacher / T)``, is kept as its k largest probabilities: their token ids
(int32) and log-probabilities (float32). The rest of the teacher's mass, ``1 - sum_topk p``, is
dropped; ``truncation_error`` reports it. The loss of a token is

    T^2 * sum_{j in top-k} p_j (log p_j - log q_j),   q = softmax(z_student / T) over the whole vocabulary,

which is KL(p || q) exactly when k is the vocabulary size, and otherwise leaves out the terms of the
tokens outside the top-k (their share of the KL is at most what their mass allows). The T^2 keeps
the gradient's scale independent of T (Hinton, Vinyals and Dean, 2015).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TeacherTopK:
    """The teacher's top-k next-token log-probabilities of (n, T) windows.

    ``ids``: (n, T-1, k) int32 token ids; ``log_probs``: (n, T-1, k) float32, at the temperature, in
    decreasing order. Row i belongs to window i of the tokens they were computed from.
    """

    ids: torch.Tensor  # (n, T-1, k) int32
    log_probs: torch.Tensor  # (n, T-1, k) float32

    def rows(self, index) -> "TeacherTopK":
        """The rows ``index`` (a slice or an index tensor over the windows)."""
        return TeacherTopK(self.ids[index], self.log_probs[index])

    def to(self, device: torch.device) -> "TeacherTopK":
        """The same rows on ``device``."""
        return TeacherTopK(self.ids.to(device), self.log_probs.to(device))

    def truncation_error(self) -> dict[str, float]:
        """The teacher mass outside the top-k per token: ``{"mean", "max"}`` over every token (float64 sums)."""
        outside = (1.0 - self.log_probs.double().exp().sum(-1)).clamp_min(0.0)  # (n, T-1)
        return {"mean": float(outside.mean()), "max": float(outside.max())}


def student_log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(logits[:, :-1] / T)`` in float32 at least (float64 stays float64): (b, T-1, V)."""
    scored = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))  # (b, T-1, V)
    return F.log_softmax(scored / temperature, dim=-1)


def top_k_log_probs(logits: torch.Tensor, temperature: float, k: int) -> TeacherTopK:
    """The teacher's top-k of (b, T, V) logits at ``temperature``: ids (b, T-1, k) int32, log-probs float32."""
    log_probs = student_log_probs(logits, temperature)  # (b, T-1, V)
    values, ids = log_probs.topk(k, dim=-1)  # (b, T-1, k) each, largest first
    return TeacherTopK(ids.to(torch.int32), values.to(torch.float32))


def truncated_kl_sum(logits: torch.Tensor, teacher: TeacherTopK, temperature: float) -> torch.Tensor:
    """``T^2 * sum over tokens and the top-k of p (log p - log q)``: a scalar, summed like ``token_loss_sum``.

    Args:
        logits: (b, T, V) the student's logits.
        teacher: the teacher's top-k of the same (b, T) windows, on the logits' device.
        temperature: T of both softmaxes.
    """
    log_q = student_log_probs(logits, temperature)  # (b, T-1, V)
    log_q_top = log_q.gather(-1, teacher.ids.long())  # (b, T-1, k)
    log_p = teacher.log_probs.to(log_q.dtype)  # (b, T-1, k)
    return (temperature * temperature) * (log_p.exp() * (log_p - log_q_top)).sum()
