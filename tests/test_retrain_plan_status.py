"""``reconstruct status`` and ``reconstruct plan`` on model-level retraining.

A ``retrain`` folder, and ``run --retrain-steps``'s stage.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from reconstruct.modelio.output import STATE_DIR
from reconstruct.retrain.checkpoint import CHECKPOINT_NAME
from reconstruct.jobs.retrain_job import MANIFEST_NAME
from reconstruct.modelio.folder_layout import RETRAIN_STAGE_NAME as STAGE_NAME
from reconstruct.reporting.retrain_status import stage_progress
from reconstruct.reporting.status import describe_job

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


# --------------------------------------------------------------------------- reconstruct plan --retrain-steps
PLAN_FLAGS = ["--device", "cpu", "--calib", "wikitext2", "--n-samples", "8", "--seq-len", "16", "--retrain-steps", "3",
              "--retrain-batch", "4", "--retrain-method", "masklora"]


def _plan(*args: str):
    from typer.testing import CliRunner

    import cli

    return CliRunner().invoke(cli.app, ["plan", *args])


def test_plan_shows_the_retraining_stage_on_both_paths(tiny_model_dir):
    result = _plan("--model", str(tiny_model_dir("llama")), *PLAN_FLAGS)
    assert result.exit_code == 0, result.output
    assert "retraining stage (3 steps, 4 x 16 tokens a step): resident, fits" in result.output
    assert "retraining memory (resident)" in result.output and "retraining memory (streamed)" in result.output


@pytest.mark.parametrize(("flags", "line"), [
    ("retrain", "retraining stage (3 steps, 4 x 16 tokens a step): streamed, does not fit"),
    ("loraprune", "LoRAPrune stage (--loraprune-objective model) (5 steps, 2 x 16 tokens a step): streamed, does not fit"),
])
def test_plan_exits_3_when_a_training_stage_cannot_fit(tiny_model_dir, monkeypatch, flags, line):
    from reconstruct.retrain import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 1)
    plan_flags = PLAN_FLAGS if flags == "retrain" else LORAPRUNE_PLAN_FLAGS
    result = _plan("--model", str(tiny_model_dir("llama")), *plan_flags)
    assert result.exit_code == 3, result.output
    assert line in result.output


def test_plan_without_retrain_steps_shows_no_stage(tiny_model_dir):
    result = _plan("--model", str(tiny_model_dir("llama")), *PLAN_FLAGS[:-6])
    assert result.exit_code == 0, result.output
    assert "retraining" not in result.output


def test_plan_from_a_config_alone_says_the_stage_needs_the_model(tiny_model_dir):
    result = _plan("--config", str(tiny_model_dir("llama") / "config.json"), *PLAN_FLAGS)
    assert result.exit_code == 0, result.output
    assert "retraining stage: not planned from --config alone" in result.output


LORAPRUNE_PLAN_FLAGS = ["--device", "cpu", "--calib", "wikitext2", "--n-samples", "8", "--seq-len", "16",
                        "--pruner", "loraprune", "--loraprune-objective", "model", "--loraprune-steps", "5"]


def test_plan_shows_the_model_level_loraprune_stage(tiny_model_dir):
    result = _plan("--model", str(tiny_model_dir("llama")), *LORAPRUNE_PLAN_FLAGS)
    assert result.exit_code == 0, result.output
    assert "LoRAPrune stage (--loraprune-objective model) (5 steps, " in result.output
    assert "retraining memory (resident)" in result.output and "retraining stage" not in result.output


def test_plan_with_loraprune_and_retraining_shows_both_stages(tiny_model_dir):
    result = _plan("--model", str(tiny_model_dir("llama")), *LORAPRUNE_PLAN_FLAGS, *PLAN_FLAGS[8:])
    assert result.exit_code == 0, result.output
    assert result.output.index("LoRAPrune stage") < result.output.index("retraining stage (3 steps")
