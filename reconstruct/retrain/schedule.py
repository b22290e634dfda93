"""The learning-rate schedule: linear warm-up, then linear decay to 0 (Hugging Face ``linear``)."""

from __future__ import annotations

import math


def warmup_steps(steps: int, warmup: float) -> int:
    """Warm-up steps for a budget of ``steps`` and a warm-up share ``warmup`` (rounded up, as HF does)."""
    return math.ceil(steps * warmup)


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (counted from 0).

    Rises linearly from 0 over the warm-up steps, then falls linearly to 0 at ``steps``, exactly as
    ``transformers.get_linear_schedule_with_warmup``.

    Args:
        step: the step about to be taken, 0-based.
        steps: the step budget.
        warmup: share of ``steps`` spent warming up, in [0, 1).
    """
    rising = warmup_steps(steps, warmup)
    if step < rising:
        return step / max(1, rising)
    return max(0.0, (steps - step) / max(1, steps - rising))
