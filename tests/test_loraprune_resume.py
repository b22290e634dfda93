"""Model-level LoRAPrune's importance and masks resume exactly: host-memory and on-disk records."""

from __future__ import annotations

import pytest
import torch

from pruners.loraprune_model import BlockLayout, HostImportanceStore, LoRAPruneController, LoRAPruneSchedule
from pruners.pattern import SparsityPattern
from reconstruct.state.importance_store import DiskImportanceStore

SHAPES = {"attn.q": (8, 16), "mlp.up": (12, 16), "mlp.down": (16, 12)}
STEPS = 10
BLOCKS = 3


def make_controller(store) -> LoRAPruneController:
    layout = BlockLayout(dict(SHAPES), pattern=SparsityPattern.parse("2:4", None))
    return LoRAPruneController([layout] * BLOCKS, LoRAPruneSchedule(total_steps=STEPS), store=store)


def train_steps(controller: LoRAPruneController, start: int, stop: int) -> None:
    """Steps ``start..stop-1`` with importance that depends on (step, block) alone, as a seeded trainer's does."""
    for step in range(start, stop):
        for index in reversed(range(BLOCKS)):
            generator = torch.Generator().manual_seed(step * 100 + index)
            importance = {name: torch.rand(shape, generator=generator) for name, shape in SHAPES.items()}
            controller.accumulate(index, step, importance)
        controller.step_done(step)


def outcome(controller: LoRAPruneController) -> tuple:
    records = [controller.store.load(index) for index in range(BLOCKS)]
    return [controller.final_masks(index) for index in range(BLOCKS)], records, controller.history


def assert_same(a: tuple, b: tuple) -> None:
    (masks_a, records_a, history_a), (masks_b, records_b, history_b) = a, b
    assert history_a == history_b
    for one, other in zip(masks_a + records_a, masks_b + records_b):
        assert one.keys() == other.keys() and all(one[key].equal(other[key]) for key in one)


@pytest.mark.parametrize("kind", ["host", "disk"])
@pytest.mark.parametrize("saved_at", [0, 3, 7])
def test_a_crash_after_a_checkpoint_resumes_to_the_same_records(tmp_path, kind, saved_at):
    def new_store(folder):
        return HostImportanceStore() if kind == "host" else DiskImportanceStore(folder)

    reference = make_controller(new_store(tmp_path / "reference"))
    train_steps(reference, 0, STEPS)

    crashed = make_controller(new_store(tmp_path / "job"))
    train_steps(crashed, 0, saved_at)
    saved = crashed.checkpoint(saved_at)  # what the trainer keeps in its checkpoint file
    train_steps(crashed, saved_at, min(saved_at + 3, STEPS))  # work after the checkpoint, lost in the crash

    resumed = make_controller(new_store(tmp_path / "job"))  # a new process on the same folder
    resumed.restore(saved_at, saved)
    train_steps(resumed, saved_at, STEPS)
    assert_same(outcome(resumed), outcome(reference))


def test_the_snapshot_before_the_last_survives_a_crash_before_the_trainer_saved(tmp_path):
    """Snapshot of step 6 written, trainer's checkpoint file of step 6 not yet: resume from step 3."""
    reference = make_controller(DiskImportanceStore(tmp_path / "reference"))
    train_steps(reference, 0, STEPS)
    crashed = make_controller(DiskImportanceStore(tmp_path / "job"))
    train_steps(crashed, 0, 3)
    saved = crashed.checkpoint(3)
    train_steps(crashed, 3, 6)
    crashed.checkpoint(6)
    resumed = make_controller(DiskImportanceStore(tmp_path / "job"))
    resumed.restore(3, saved)
    train_steps(resumed, 3, STEPS)
    assert_same(outcome(resumed), outcome(reference))
    assert [path.name for path in sorted((tmp_path / "job").glob("snapshot-*"))] == ["snapshot-00000003"]


def test_the_disk_store_refuses_a_missing_snapshot(tmp_path):
    store = DiskImportanceStore(tmp_path)
    with pytest.raises(RuntimeError, match="no importance snapshot of step 4"):
        store.restore(4, {})
