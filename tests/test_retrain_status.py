"""``reconstruct status`` on model-level retraining: a ``retrain`` folder, and ``run --retrain-steps``'s stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from reconstruct.modelio.output import STATE_DIR
from reconstruct.retrain.checkpoint import CHECKPOINT_NAME
from reconstruct.retrain.job import MANIFEST_NAME
from reconstruct.retrain.stage import STAGE_NAME
from reconstruct.retrain.status import stage_progress
from reconstruct.state.status import describe_job

SPEC = {"method": "masklora", "steps": 6, "batch": 4, "seq_len": 16, "lr": 0.01, "seed": 0}


def _checkpoint(out: Path, step: int) -> None:
    """A training checkpoint whose header says ``step`` (what ``save_checkpoint`` writes)."""
    save_file({"param.x": torch.zeros(1)}, out / STATE_DIR / CHECKPOINT_NAME, metadata={"step": str(step)})


def _retrain_folder(tmp_path: Path, finished: bool) -> Path:
    out = tmp_path / "out"
    (out / STATE_DIR).mkdir(parents=True)
    fingerprint = {"retrain": SPEC, "data": {"file": "valid.txt", "sha256": "0"}, "dtype": "float32"}
    (out / STATE_DIR / MANIFEST_NAME).write_text(json.dumps({"fingerprint": fingerprint, "finished": finished}))
    return out


def test_status_of_an_interrupted_retrain_folder_says_the_step(tmp_path):
    out = _retrain_folder(tmp_path, finished=False)
    assert "not started" in describe_job(out) and "step 0 of 6" in describe_job(out)
    _checkpoint(out, 4)
    text = describe_job(out)
    assert "(reconstruct retrain)" in text and "interrupted" in text
    assert "retrain:    step 4 of 6 (last checkpoint)" in text
    assert "masklora" in text and "valid.txt" in text


def test_status_of_a_finished_retrain_folder(tmp_path):
    text = describe_job(_retrain_folder(tmp_path, finished=True))
    assert "state:      finished" in text and "retrain:    step 6 of 6" in text


def test_status_of_a_damaged_retrain_manifest_is_one_clear_error(tmp_path):
    out = _retrain_folder(tmp_path, finished=False)
    (out / STATE_DIR / MANIFEST_NAME).write_text("{")
    with pytest.raises(ValueError, match="is damaged"):
        describe_job(out)


@pytest.mark.parametrize("stage, layerwise_finished, checkpoint, expected", [
    (None, False, None, "3 steps after the layer-wise loop (not started)"),
    (None, True, None, "step 0 of 3 (last checkpoint)"),
    ({"layerwise_evaluation": None}, True, 2, "step 2 of 3 (last checkpoint)"),
    ({"staged": {"shards": {}}}, True, None, "trained (3 of 3 steps); the retrained blocks are being swapped in"),
    ({"staged": {"shards": {}}, "finished": True}, True, None, "finished (3 of 3 steps)"),
])
def test_stage_progress(tmp_path, stage, layerwise_finished, checkpoint, expected):
    (tmp_path / STATE_DIR).mkdir()
    if stage is not None:
        (tmp_path / STATE_DIR / STAGE_NAME).write_text(json.dumps(stage))
    if checkpoint is not None:
        _checkpoint(tmp_path, checkpoint)
    assert stage_progress(tmp_path, 3, layerwise_finished) == expected
