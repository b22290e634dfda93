"""``reconstruct retrain`` end to end: refusals before any work, kill-and-resume byte-identical."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cli
from conftest import REPO
from forked_cli import run_reconstruct
from reconstruct.modelio.output import INDEX_NAME, REPORT_NAME, STATE_DIR
from reconstruct.retrain.checkpoint import CHECKPOINT_NAME
from reconstruct.jobs.retrain_job import MANIFEST_NAME
from reconstruct.faults import CRASH_ENV
from reconstruct.state.manifest import MANIFEST_NAME as RUN_MANIFEST
from test_resume import VOLATILE_BLOCK_KEYS, VOLATILE_REPORT_KEYS

runner = CliRunner()
SCHEDULE_EARLY = True  # conftest: many whole jobs, so this module starts first
FLAGS = ["--device", "cpu", "--seq-len", "16", "--n-windows", "8", "--batch", "4", "--micro-batch", "2",
         "--steps", "4", "--method", "masklora", "--lr", "1e-2", "--eval-every", "2", "--val", "0.25"]


def invoke(*args: str):
    return runner.invoke(cli.app, ["retrain", *args])


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


# --------------------------------------------------------------------------- refusals
def test_a_model_with_no_zeros_is_refused_offering_allow_dense(tiny_model_dir, small_calib_file, tmp_path):
    out = tmp_path / "out"
    line = one_error_line(invoke("--model", str(tiny_model_dir("llama")), "--data", str(small_calib_file),
                                 "--out", str(out), *FLAGS))
    assert "nothing looks pruned" in line and "--allow-dense" in line
    assert not out.exists()


@pytest.mark.parametrize(("extra", "words"), [
    (["--method", "lora"], "--allow-dense-merge"),
    (["--seq-len", "1000"], "--seq-len"),
    (["--warmup", "1.5"], "--warmup"),
    (["--checkpoint-every", "0"], "--checkpoint-every"),
])
def test_bad_settings_are_one_line_and_write_nothing(pruned_llama, small_calib_file, tmp_path, extra, words):
    out = tmp_path / "out"
    line = one_error_line(invoke("--model", str(pruned_llama), "--data", str(small_calib_file), "--out", str(out),
                                 *FLAGS, *extra))
    assert words in line
    assert not (out / INDEX_NAME).exists()


@pytest.mark.parametrize("text", ["", "only a few words\n"])
def test_empty_or_too_short_data_is_refused(pruned_llama, tmp_path, text):
    data = tmp_path / "data.txt"
    data.write_text(text)
    line = one_error_line(invoke("--model", str(pruned_llama), "--data", str(data), "--out", str(tmp_path / "o"),
                                 *FLAGS))
    assert "--data" in line and "--seq-len" in line


# --------------------------------------------------------------------------- resume
def run_cli(out: Path, model: Path, data: Path, crash: str | None = None, *extra: str,
            fresh: bool = False) -> subprocess.CompletedProcess:
    """``reconstruct retrain`` in a process of its own (``forked_cli``; ``fresh``: a new interpreter)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
    env.pop(CRASH_ENV, None)
    if crash is not None:
        env[CRASH_ENV] = crash
    args = ["retrain", "--model", str(model), "--data", str(data), "--out", str(out), "--checkpoint-every", "1",
            "--stream", "always", *FLAGS, *extra]
    return run_reconstruct(args, env=env, cwd=REPO, timeout=240, fresh=fresh)


def model_files(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.iterdir())
            if path.is_file() and path.name not in (REPORT_NAME, "report.md", "report.png", RUN_MANIFEST)}


def comparable_report(out: Path) -> dict:
    report = json.loads((out / REPORT_NAME).read_text())
    for key in ("peak_rss_mb", "peak_gpu_mb", "seconds_this_session"):
        report.pop(key)
    for key in ("seconds_per_step", "read_share", "tokens_per_second"):
        report["retrain"].pop(key)
    return report


@pytest.fixture(scope="module")
def retrain_reference(pruned_llama, small_calib_file, tmp_path_factory) -> Path:
    """One uninterrupted ``retrain`` (a fresh interpreter: the runs compared with it are forked)."""
    reference = tmp_path_factory.mktemp("retrain-reference") / "out"
    result = run_cli(reference, pruned_llama, small_calib_file, fresh=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return reference


@pytest.mark.parametrize("crash", ["retrain-step:3", "write:model-00002-of-00004.safetensors"])
def test_killed_and_rerun_gives_the_same_bytes(pruned_llama, small_calib_file, retrain_reference, tmp_path, crash):
    reference, out = retrain_reference, tmp_path / "out"
    killed = run_cli(out, pruned_llama, small_calib_file, crash)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (out / REPORT_NAME).exists()
    resumed = run_cli(out, pruned_llama, small_calib_file)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    if crash.startswith("retrain-step"):
        assert "resuming after step 2" in resumed.stderr  # killed before step 3 was saved
    assert model_files(out) == model_files(reference)
    assert comparable_report(out) == comparable_report(reference)
    assert not (out / STATE_DIR / CHECKPOINT_NAME).exists()
    assert json.loads((out / STATE_DIR / MANIFEST_NAME).read_text())["finished"]


def test_a_different_job_on_the_same_out_is_refused_naming_the_flag(pruned_llama, small_calib_file, tmp_path):
    out = tmp_path / "out"
    assert run_cli(out, pruned_llama, small_calib_file, "retrain-step:2").returncode == -signal.SIGKILL
    refused = run_cli(out, pruned_llama, small_calib_file, None, "--lr", "2e-2")
    assert refused.returncode == 2
    assert "--lr: 0.01 (on disk) vs 0.02 (now)" in refused.stderr


# --------------------------------------------------------------------------- run --retrain-steps
RUN_FLAGS = ["--device", "cpu", "--n-samples", "8", "--seq-len", "16", "--pruner", "wanda", "--method", "masklora",
             "--recon-steps", "2", "--checkpoint-every", "1", "--retrain-steps", "3", "--retrain-windows", "8",
             "--retrain-batch", "4", "--retrain-lr", "1e-2", "--retrain-val", "0.25", "--micro-batch", "2"]


def run_job_cli(out: Path, model: Path, data: Path, crash: str | None = None, *extra: str, fresh: bool = False):
    """``reconstruct run`` in a process of its own (``forked_cli``; ``fresh``: a new interpreter)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
    env.pop(CRASH_ENV, None)
    if crash is not None:
        env[CRASH_ENV] = crash
    args = ["run", "--model", str(model), "--calib", str(data), "--out", str(out), *RUN_FLAGS, *extra]
    return run_reconstruct(args, env=env, cwd=REPO, timeout=240, fresh=fresh)


def comparable_run_report(out: Path) -> dict:
    report = json.loads((out / REPORT_NAME).read_text())
    for key in VOLATILE_REPORT_KEYS:
        report.pop(key, None)
    for block in report["blocks"]:
        for key in VOLATILE_BLOCK_KEYS:
            block.pop(key, None)
    for key in ("seconds_per_step", "read_share", "tokens_per_second"):
        report["retrain"].pop(key)
    return report


@pytest.fixture(scope="module")
def run_reference(tiny_model_dir, small_calib_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run-reference") / "out"
    result = run_job_cli(out, tiny_model_dir("llama"), small_calib_file, fresh=True)  # compared with forked runs
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_run_with_retrain_steps_retrains_after_the_loop(run_reference, tiny_model_dir):
    report = json.loads((run_reference / REPORT_NAME).read_text())
    assert report["retrain"]["steps"] == 3 and len(report["retrain"]["loss_curve"]) == 3
    assert read_stage_finished(run_reference)
    assert not (run_reference / STATE_DIR / "retrained").exists()
    assert "## Model-level retraining" in (run_reference / "report.md").read_text()


def read_stage_finished(out: Path) -> bool:
    from reconstruct.state.retrain_stage_record import read_stage

    return bool(read_stage(out).get("finished"))


@pytest.mark.parametrize("crash", ["retrain-step:2", "retrain-staged", "retrain-swap:model-00002-of-00004.safetensors",
                                   "write:model.safetensors.index.json@2"])
def test_run_killed_in_the_retraining_stage_resumes_to_the_same_bytes(run_reference, tiny_model_dir, small_calib_file,
                                                                      tmp_path, crash):
    out = tmp_path / "out"
    killed = run_job_cli(out, tiny_model_dir("llama"), small_calib_file, crash)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run_job_cli(out, tiny_model_dir("llama"), small_calib_file)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "reconstruct.jobs.run_job: block" not in resumed.stderr  # the layer-wise blocks are not recomputed
    if crash != "retrain-step:2":
        assert "retrain step" not in resumed.stderr  # staged: never trained (nor merged) twice
    assert model_files(out) == model_files(run_reference)
    assert comparable_run_report(out) == comparable_run_report(run_reference)


def test_run_refuses_a_retraining_stage_that_cannot_fit_before_any_block(tiny_model_dir, small_calib_file, tmp_path,
                                                                         monkeypatch):
    from reconstruct.retrain import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 1)
    out = tmp_path / "out"
    result = runner.invoke(cli.app, ["run", "--model", str(tiny_model_dir("llama")), "--calib", str(small_calib_file),
                                     "--out", str(out), *RUN_FLAGS])
    line = one_error_line(result)
    assert "--retrain-samples-per-step" in line and "--retrain-seq-len" in line
    assert not (out / INDEX_NAME).exists()


def test_self_generated_data_trains_and_writes_a_loadable_folder(pruned_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    result = invoke("--model", str(pruned_llama), "--data", "self", "--out", str(out), *FLAGS, "--steps", "1")
    assert result.exit_code == 0, result.output
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["job"]["data"] == "self" and report["retrain"]["steps"] == 1
    assert AutoModelForCausalLM.from_pretrained(out) is not None


@pytest.mark.parametrize(("extra", "flag"), [(["--retrain-val", "1.5"], "--retrain-val"),
                                             (["--retrain-lr", "0"], "--retrain-lr")])
def test_run_names_its_own_retrain_flag_in_a_refusal(tiny_model_dir, small_calib_file, tmp_path, extra, flag):
    """``run`` has no ``--val`` or ``--lr`` of the stage: the refusal names the ``--retrain-*`` flag."""
    out = tmp_path / "out"
    line = one_error_line(runner.invoke(cli.app, ["run", "--model", str(tiny_model_dir("llama")), "--calib",
                                                  str(small_calib_file), "--out", str(out), *RUN_FLAGS, *extra]))
    assert line.startswith(f"error: {flag} ")
    assert not out.exists()


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's IHDR chunk."""
    header = path.read_bytes()[16:24]
    return int.from_bytes(header[:4], "big"), int.from_bytes(header[4:], "big")


@pytest.mark.figures  # write_run_report draws here
def test_run_report_png_gets_the_retraining_loss_curve(run_reference, tmp_path, monkeypatch):
    from reconstruct.reporting import plots
    from reconstruct.reporting.report import write_run_report

    pytest.importorskip("matplotlib")
    assert _png_size(run_reference / "report.png")[1] == 9 * plots.PNG_DPI  # three panels: 8 x 9 inches
    report = json.loads((run_reference / REPORT_NAME).read_text())
    drawn = []
    monkeypatch.setattr(plots, "draw_training_curve", lambda axes, retrain: drawn.append(retrain))
    assert write_run_report(tmp_path, report)
    assert drawn == [report["retrain"]] and len(drawn[0]["loss_curve"]) == 3
    drawn.clear()
    assert write_run_report(tmp_path, {key: value for key, value in report.items() if key != "retrain"})
    assert drawn == [] and _png_size(tmp_path / "report.png")[1] == 6 * plots.PNG_DPI  # no stage: two panels


def test_run_with_self_data_samples_the_retraining_windows_from_the_dense_model(tiny_model_dir, tmp_path, monkeypatch):
    """``run --calib self --retrain-steps``: the stage's windows come from the input model, as the run's do.

    Before, they were sampled from the pruned layer-wise folder being repaired: text from a damaged model.
    """
    import torch

    from reconstruct.retrain import data as retrain_data

    model = tiny_model_dir("llama")
    sampled_from = []
    real = retrain_data.generate_self_calibration

    def recording(folder, *args, **kwargs) -> torch.Tensor:
        sampled_from.append(Path(folder).resolve())
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(retrain_data, "generate_self_calibration", recording)
    out = tmp_path / "out"
    result = runner.invoke(cli.app, ["run", "--model", str(model), "--calib", "self", "--out", str(out), *RUN_FLAGS])
    assert result.exit_code == 0, result.output
    assert sampled_from == [Path(model).resolve()]


def test_run_checkpoints_the_retraining_stage_every_k_steps_as_told(tiny_model_dir, small_calib_file, tmp_path,
                                                                    monkeypatch):
    """``--checkpoint-every k`` is k blocks in the loop and k optimizer steps in the stage (as for LoRAPrune's)."""
    from reconstruct.jobs import retrain_stage as stage

    asked = []
    real = stage.auto_or_every
    monkeypatch.setattr(stage, "auto_or_every", lambda every, *args: asked.append(every) or real(every, *args))
    flags = [flag for flag in RUN_FLAGS]
    flags[flags.index("--checkpoint-every") + 1] = "2"
    result = runner.invoke(cli.app, ["run", "--model", str(tiny_model_dir("llama")), "--calib", str(small_calib_file),
                                     "--out", str(tmp_path / "out"), *flags])
    assert result.exit_code == 0, result.output
    assert asked == [2]
