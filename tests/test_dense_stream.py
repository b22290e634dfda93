"""A plain prune carries no dense stream; ``--track-error`` brings it back without changing a single weight.

``--method none`` with magnitude, Wanda or SparseGPT needs only the pruned model's activations: the
engine skips the dense model's forward (one block forward per block) and its stream (half the
activation memory), and the report says the block error was not measured. The same job with
``--track-error`` measures it and must write byte-identical shards.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from conftest import make_job
from typer.testing import CliRunner

from cli import app
from reconstruct.jobs.run_job import run_job
from reconstruct.modelio.loaded import load_model
from reconstruct.methods.spec import ReconSpec
from reconstruct.modelio.output import STATE_DIR
from reconstruct.planner import plan_job


def shard_bytes(out) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.glob("model-*.safetensors"))}


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_track_error_measures_the_error_and_changes_no_byte(tiny_model_dir, small_calib_file, tmp_path, pruner):
    plain = make_job(tiny_model_dir("llama"), tmp_path / "plain", pruner, sparsity=0.5, calib=small_calib_file)
    tracked = replace(plain, out=tmp_path / "tracked", track_error=True)
    plain_report, tracked_report = run_job(plain), run_job(tracked)
    assert all(block["mse_before"] is None and block["mse_after"] is None for block in plain_report["blocks"])
    assert all(block["mse_after"] > 0 for block in tracked_report["blocks"])
    assert shard_bytes(plain.out) == shard_bytes(tracked.out)
    block_rows = [line for line in (plain.out / "report.md").read_text().splitlines() if line.startswith("| 1 |")]
    assert block_rows and "| – | – |" in block_rows[0]  # MSE before / after: not measured


def test_plain_prune_checkpoints_only_the_pruned_stream(tiny_model_dir, small_calib_file, tmp_path, monkeypatch):
    job = make_job(tiny_model_dir("llama"), tmp_path / "out", "wanda", sparsity=0.5, calib=small_calib_file)
    saved: list[set[str]] = []
    import reconstruct.jobs.job_state as job_state

    original = job_state.save_safetensors_atomic

    def spy(path, tensors, *args, **kwargs):
        if path.parent.name == STATE_DIR and path.name.startswith("streams-"):
            saved.append(set(tensors))
        return original(path, tensors, *args, **kwargs)

    monkeypatch.setattr(job_state, "save_safetensors_atomic", spy)
    run_job(job)
    assert saved and all(names == {"sparse"} for names in saved)


def test_reconstruction_and_loraprune_keep_the_dense_stream(tiny_model_dir, small_calib_file, tmp_path):
    job = make_job(tiny_model_dir("llama"), tmp_path / "out", "wanda", sparsity=0.5, calib=small_calib_file)
    assert not job.needs_dense_stream
    assert replace(job, track_error=True).needs_dense_stream
    assert replace(job, recon=ReconSpec(method="bias-ln")).needs_dense_stream
    assert not replace(job, recon=ReconSpec(method="none")).needs_dense_stream
    assert replace(job, prune=replace(job.prune, pruner="loraprune")).needs_dense_stream


def test_plan_counts_one_stream_for_a_plain_prune(tiny_model_dir, small_calib_file, tmp_path):
    model = tiny_model_dir("llama")
    loaded = load_model(str(model), "cpu", "float32")
    job = make_job(model, tmp_path / "unused", "wanda", sparsity=0.5, calib=small_calib_file)
    plain = plan_job(job, loaded)
    repaired = plan_job(replace(job, recon=ReconSpec(method="bias-ln")), loaded)
    assert plain.sizes["n_streams"] == 1 and repaired.sizes["n_streams"] == 2
    phases = {phase.name.split(" (")[0] for phase in plain.phases}
    assert "dense pass" not in phases
    assert "dense pass" in {phase.name.split(" (")[0] for phase in repaired.phases}
    assert "activation streams (1)" in {item.name for phase in plain.phases for item in phase.items}


def test_track_error_flag_reaches_the_job(tiny_model_dir, small_calib_file, tmp_path):
    args = ["run", "--model", str(tiny_model_dir("llama")), "--calib", str(small_calib_file), "--n-samples", "8",
            "--seq-len", "32", "--device", "cpu", "--pruner", "wanda", "--sparsity", "0.5", "--method", "none"]
    for flag, measured in ((None, False), ("--track-error", True)):
        out = tmp_path / str(flag)
        result = CliRunner().invoke(app, [*args, "--out", str(out), *([flag] if flag else [])])
        assert result.exit_code == 0, result.output
        blocks = json.loads((out / "reconstruct.json").read_text())["blocks"]
        assert all((block["mse_after"] is not None) == measured for block in blocks)
