"""When to checkpoint the activation streams after a block: every k blocks, or ``auto``.

A stream checkpoint is what lets a killed job resume after the last checkpointed block instead of
block 0; blocks written after it are recomputed on resume (bit-identically). Its cost grows with
the streams, not the block: a 30B-wide model at 128 x 2048 calibration tokens writes two bf16
streams of 3.8 GB each, seconds per block, while SmolLM2's 16 x 256 tokens take milliseconds.

``auto`` (the default) checkpoints after every block while checkpoints are cheap (the last one took
under ``CHEAP_SECONDS``), and otherwise once the blocks computed since the last checkpoint took at
least ``1 / MAX_OVERHEAD`` times as long as that checkpoint did. The write then costs at most
``MAX_OVERHEAD`` of the compute, and a crash loses about ``1 / MAX_OVERHEAD`` checkpoint-writes' worth
of block time. An integer k checkpoints after every k-th block, whatever it costs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from reconstruct.config import CHECKPOINT_AUTO as AUTO
from reconstruct.config import parse_checkpoint_every  # noqa: F401  (re-exported for the policy's callers)

MAX_OVERHEAD = 0.1  # auto: checkpoint writes take at most this fraction of the block time between them
CHEAP_SECONDS = 0.5  # auto: a checkpoint faster than this is taken after every block


class CheckpointPolicy:
    """Decides, after each finished block, whether to checkpoint the streams now.

    Args:
        every: ``"auto"`` or a block count (see the module docstring).
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, every: str | int, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = parse_checkpoint_every(every)
        self.clock = clock
        self.last_end = clock()  # end of the last checkpoint (or when this session started)
        self.last_seconds: float | None = None  # how long the last checkpoint took; None: none yet

    def due(self, index: int) -> bool:
        """True when the streams should be checkpointed after block ``index`` (0-based)."""
        if self.every != AUTO:
            return (index + 1) % self.every == 0
        if self.last_seconds is None or self.last_seconds < CHEAP_SECONDS:
            return True
        return self.last_seconds <= MAX_OVERHEAD * (self.clock() - self.last_end)

    @property
    def expensive(self) -> bool:
        """True when the last checkpoint took ``CHEAP_SECONDS`` or more (worth telling the user)."""
        return self.last_seconds is not None and self.last_seconds >= CHEAP_SECONDS

    def describe_next(self) -> str:
        """When the next checkpoint comes, in words (for the log)."""
        if self.every != AUTO:
            return f"{self.every}: the next after {self.every} more blocks"
        if not self.expensive:
            return "auto: the next after the next block"
        return f"auto: the next once blocks took {self.last_seconds / MAX_OVERHEAD:.0f}s"

    def started(self) -> float:
        """Call when a checkpoint starts; returns the start time for :meth:`finished`."""
        return self.clock()

    def finished(self, started: float) -> None:
        """Call when the checkpoint that began at ``started`` is safely written."""
        self.last_end = self.clock()
        self.last_seconds = self.last_end - started


def simulate_schedule(every: str | int, n_blocks: int, block_seconds: float, write_seconds: float) -> list[int]:
    """Blocks (0-based) after which :class:`CheckpointPolicy` checkpoints when every block takes
    ``block_seconds`` and every checkpoint ``write_seconds``: the policy run on a simulated clock."""
    now = 0.0
    policy = CheckpointPolicy(every, clock=lambda: now)
    taken = []
    for index in range(n_blocks):
        now += block_seconds
        if policy.due(index):
            started = policy.started()
            now += write_seconds
            policy.finished(started)
            taken.append(index)
    return taken
