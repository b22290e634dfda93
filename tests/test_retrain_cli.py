"""``reconstruct retrain`` end to end: refusals before any work, kill-and-resume byte-identical."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cli
from conftest import REPO
from reconstruct.modelio.output import INDEX_NAME, REPORT_NAME, STATE_DIR
from reconstruct.retrain.checkpoint import CHECKPOINT_NAME
from reconstruct.retrain.job import MANIFEST_NAME
from reconstruct.state.faults import CRASH_ENV
from test_retrain import prune_folder

runner = CliRunner()
FLAGS = ["--device", "cpu", "--seq-len", "16", "--n-windows", "8", "--batch", "4", "--micro-batch", "2",
         "--steps", "4", "--method", "masklora", "--lr", "1e-2", "--eval-every", "2", "--val", "0.25"]


@pytest.fixture(scope="module")
def pruned_llama(tiny_model_dir, tmp_path_factory) -> Path:
    """A copy of the tiny LLaMA whose block linears are half zero."""
    import shutil

    folder = tmp_path_factory.mktemp("pruned") / "llama"
    shutil.copytree(tiny_model_dir("llama"), folder)
    prune_folder(folder, "llama")
    return folder


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
def run_cli(out: Path, model: Path, data: Path, crash: str | None = None, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
    env.pop(CRASH_ENV, None)
    if crash is not None:
        env[CRASH_ENV] = crash
    command = [sys.executable, "-m", "reconstruct", "retrain", "--model", str(model), "--data", str(data),
               "--out", str(out), "--checkpoint-every", "1", "--stream", "always", *FLAGS, *extra]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


def model_files(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.iterdir())
            if path.is_file() and path.name not in (REPORT_NAME, "report.md", "report.png")}


def comparable_report(out: Path) -> dict:
    report = json.loads((out / REPORT_NAME).read_text())
    for key in ("peak_rss_mb", "peak_gpu_mb", "seconds_this_session"):
        report.pop(key)
    for key in ("seconds_per_step", "read_share", "tokens_per_second"):
        report["retrain"].pop(key)
    return report


@pytest.mark.parametrize("crash", ["retrain-step:3", "write:model-00002-of-00004.safetensors"])
def test_killed_and_rerun_gives_the_same_bytes(pruned_llama, small_calib_file, tmp_path, crash):
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert run_cli(reference, pruned_llama, small_calib_file).returncode == 0
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
