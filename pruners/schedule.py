"""Iterative pruning (``--cycles K``): the pattern each of the K prune -> reconstruct cycles reaches.

Cycle ``c`` (1..K) reaches the fraction ``f_c`` of the target:

- ``cubic`` (default; LoRAPrune's iterative schedule, after Zhu & Gupta 2017):
  ``f_c = 1 - (1 - c / K)^3``: most weights go early, while the block is still close to dense, and
  the last cycles remove few, so the final reconstruction repairs a small step;
- ``linear``: ``f_c = c / K``.

Unstructured targets scale the sparsity (``s * f_c``); N:M targets prune ``round((M - N) * f_c)`` of
every M (the intermediate ``(M - k):M`` patterns; none in a cycle where that rounds to 0); heads and
channels scale the fraction of groups. Counts never shrink from one cycle to the next, the last
cycle is exactly the target pattern, and the engine nests each cycle's keep mask in the previous
one (``within``), so earlier zeros stay zero.
"""

from __future__ import annotations

import math
from dataclasses import replace

from pruners.pattern import N_OF_M, UNSTRUCTURED, SparsityPattern

SCHEDULES = ("cubic", "linear")


def schedule_fraction(cycle: int, cycles: int, schedule: str = "cubic") -> float:
    """The share of the target reached after ``cycle`` of ``cycles`` (1-based): 1.0 at the last."""
    if schedule not in SCHEDULES:
        raise ValueError(f"--cycle-schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if cycles < 1 or not 1 <= cycle <= cycles:
        raise ValueError(f"--cycles must be >= 1 (cycle {cycle} of {cycles})")
    progress = cycle / cycles
    return 1.0 - (1.0 - progress) ** 3 if schedule == "cubic" else progress


def cycle_pattern(pattern: SparsityPattern, cycle: int, cycles: int, schedule: str = "cubic") -> SparsityPattern:
    """The pattern cycle ``cycle`` (1-based) of ``cycles`` prunes to; ``pattern`` itself at the last."""
    if cycle == cycles:
        return pattern
    return scaled_pattern(pattern, schedule_fraction(cycle, cycles, schedule))


def scaled_pattern(pattern: SparsityPattern, fraction: float) -> SparsityPattern:
    """``pattern`` at ``fraction`` (0..1) of its sparsity (see the module docstring); itself at 1."""
    if fraction >= 1.0:
        return pattern
    if pattern.kind == N_OF_M:
        pruned = int(math.floor((pattern.m - pattern.n) * fraction + 0.5))
        if pruned == 0:
            return SparsityPattern(kind=UNSTRUCTURED, sparsity=0.0)
        kept = pattern.m - pruned
        return replace(pattern, n=kept, sparsity=1.0 - kept / pattern.m)
    return replace(pattern, sparsity=pattern.sparsity * fraction)
