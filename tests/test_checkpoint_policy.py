"""When the activation streams are checkpointed: every k blocks, or auto with a bounded cost."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconstruct.state.checkpoint_policy import (
    CHEAP_SECONDS,
    MAX_OVERHEAD,
    CheckpointPolicy,
    parse_checkpoint_every,
    simulate_schedule,
)
from reconstruct.config import JobConfig


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_every_k_blocks_ignores_the_cost():
    assert simulate_schedule(3, 10, block_seconds=1.0, write_seconds=100.0) == [2, 5, 8]


def test_auto_checkpoints_every_block_while_checkpoints_are_cheap():
    taken = simulate_schedule("auto", 8, block_seconds=0.01, write_seconds=CHEAP_SECONDS / 2)
    assert taken == list(range(8))


def test_auto_bounds_the_overhead_of_expensive_checkpoints():
    # a 30B-like run: 10 s per block, 6 s per checkpoint write
    taken = simulate_schedule("auto", 60, block_seconds=10.0, write_seconds=6.0)
    assert taken[0] == 0  # the first one measures the cost
    gaps = {b - a for a, b in zip(taken, taken[1:])}
    assert gaps == {6}  # 6 s <= 0.1 x (6 blocks x 10 s)
    overhead = len(taken[1:]) * 6.0 / (60 * 10.0)
    assert overhead <= MAX_OVERHEAD
    assert CheckpointPolicy("auto").describe_next() == "auto: the next after the next block"


def test_describe_next_names_the_wait_after_an_expensive_checkpoint():
    clock = FakeClock()
    policy = CheckpointPolicy("auto", clock)
    started = policy.started()
    clock.now += 6.0
    policy.finished(started)
    assert policy.expensive
    assert policy.describe_next() == "auto: the next once blocks took 60s"
    assert CheckpointPolicy(4, clock).describe_next() == "4: the next after 4 more blocks"


@pytest.mark.parametrize("text,expected", [("auto", "auto"), ("AUTO", "auto"), ("1", 1), ("12", 12), (4, 4)])
def test_parse_accepts_auto_and_block_counts(text, expected):
    assert parse_checkpoint_every(text) == expected


@pytest.mark.parametrize("text", ["0", "-2", "1.5", "10m", "", True])
def test_parse_refuses_anything_else_naming_the_flag(text):
    with pytest.raises(ValueError, match="--checkpoint-every"):
        parse_checkpoint_every(text)


def test_job_config_normalises_the_flag():
    assert JobConfig(model="m", out=Path("o"), checkpoint_every="2").checkpoint_every == 2
    assert JobConfig(model="m", out=Path("o")).checkpoint_every == "auto"
    with pytest.raises(ValueError, match="--checkpoint-every"):
        JobConfig(model="m", out=Path("o"), checkpoint_every="0")
