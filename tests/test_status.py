"""``reconstruct status DIR``: progress, time estimate and settings of a job, read from its folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from forked_cli import run_reconstruct
from reconstruct.faults import CRASH_ENV
from reconstruct.reporting.status import describe_job, format_duration
from reconstruct.state.lock import LOCK_NAME
from reconstruct.state.manifest import MANIFEST_NAME, Manifest

REPO = Path(__file__).resolve().parents[1]
CALIB_CHARS = 50_000
RUN_FLAGS = ["--n-samples", "8", "--seq-len", "32", "--device", "cpu", "--pruner", "sparsegpt",
             "--method", "bias-ln", "--recon-steps", "4"]
FINGERPRINT = {  # the parts of a job fingerprint that status shows
    "model_type": "llama",
    "pruner": "wanda",
    "pattern": {"kind": "nm", "n": 2, "m": 4, "sparsity": 0.5, "scope": "row"},
    "method": {"method": "masklora", "steps": 32, "lr": 0.0005, "rank": 16},
    "calibration": {"source": {"name": "self"}, "n_samples": 128, "seq_len": 2048},
    "seed": 7,
    "dtype": "bfloat16",
}


def run_cli(*args: str, crash: str | None = None) -> subprocess.CompletedProcess:
    """``python -m reconstruct ARGS`` in a process of its own (``forked_cli``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    env.pop(CRASH_ENV, None)
    if crash:
        env[CRASH_ENV] = crash
    return run_reconstruct(list(args), env=env, cwd=REPO, timeout=240)


def status(folder: Path):
    """``reconstruct status folder`` in process."""
    return CliRunner().invoke(app, ["status", str(folder)])


def field(text: str, name: str) -> str:
    """The value of the ``name:`` line of the status text."""
    for line in text.splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name!r} line in:\n{text}")


@pytest.fixture(scope="module")
def half_done(tiny_model_dir, calib_file, tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny LLaMA job (3 blocks) killed while collecting block 2's statistics, and its run arguments."""
    text = calib_file.read_text(encoding="utf-8")[:CALIB_CHARS]
    calib = tmp_path_factory.mktemp("calib") / "valid-head.txt"
    calib.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")
    out = tmp_path_factory.mktemp("status") / "out"
    args = ["run", "--model", str(tiny_model_dir("llama")), "--calib", str(calib), *RUN_FLAGS]
    result = run_cli(*args, "--out", str(out), crash="writer:2")  # block 2 computed, not written; blocks 0 and 1 done
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    return out, args


def synthetic_job(out: Path, n_blocks: int, seconds: list[float], elapsed: float) -> Manifest:
    """A saved manifest with the first ``len(seconds)`` blocks done, each taking those seconds."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.new(FINGERPRINT, n_blocks)
    for index, took in enumerate(seconds):
        stats = {"seconds": took, "sparsity": {"q": 0.5, "k": 0.5}, "mse_before": 2e-3, "mse_after": 1e-3}
        manifest.mark_block_done(index, f"model-{index + 1:05d}-of-{n_blocks + 1:05d}.safetensors", "0" * 64, stats)
    manifest.elapsed_seconds = elapsed
    manifest.save(out)
    return manifest


# --------------------------------------------------------------------------- real jobs
def test_status_of_crashed_half_done_job(half_done):
    out, _ = half_done
    result = status(out)

    assert result.exit_code == 0, result.output
    text = result.stdout
    assert field(text, "state").startswith("in progress, interrupted")
    assert "rerun the same command to resume" in text
    assert field(text, "blocks") == "2 / 3 done"
    assert field(text, "time left").startswith("about ") and "1 block ×" in text
    assert field(text, "resume") == "at block 3 of 3 (streams checkpointed after block 2)"  # cheap: after every block
    assert field(text, "pruner") == "sparsegpt, pattern unstructured 50% per row"
    assert field(text, "method") == "bias-ln (4 steps, lr 0.005)"
    assert field(text, "calib") == "valid-head.txt, 8 × 32 tokens"
    assert field(text, "seed") == "0, dtype float32"
    assert field(text, "quality").startswith("mean sparsity 0.5000, mean mse ")
    assert len(text.splitlines()) <= 12
    assert not (out / LOCK_NAME).exists() or "running" not in field(text, "state")  # its owner was killed


def test_status_of_finished_job(half_done, tmp_path):
    crashed_out, args = half_done
    out = tmp_path / "out"
    shutil.copytree(crashed_out, out)
    resumed = run_cli(*args, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    result = run_cli("status", str(out))  # the command line as a user types it

    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert field(text, "state") == "finished"
    assert field(text, "blocks") == "3 / 3 done"
    assert field(text, "time left") == "none (finished)"
    elapsed = Manifest.load(out).elapsed_seconds
    assert field(text, "elapsed").startswith(format_duration(elapsed))
    assert field(text, "model") == "llama"


def test_status_of_folder_without_job(tmp_path):
    result = status(tmp_path)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {tmp_path} holds no reconstruct job (no {MANIFEST_NAME})"
    missing = status(tmp_path / "missing")
    assert missing.exit_code == 2
    assert missing.stderr.strip() == (f"error: {tmp_path / 'missing'}: no such folder "
                                      "(pass the --out folder of a reconstruct run)")


def test_status_of_damaged_manifest(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text('{"version": 1, "finger')
    result = status(tmp_path)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and "is damaged" in result.stderr
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- synthetic manifests
def test_time_left_is_mean_block_time_times_blocks_left(tmp_path):
    synthetic_job(tmp_path, n_blocks=6, seconds=[10.0, 20.0], elapsed=125.0)
    text = describe_job(tmp_path)
    assert field(text, "blocks") == "2 / 6 done"
    assert field(text, "elapsed").startswith("2m 05s")
    assert field(text, "time left") == "about 1m 00s (4 blocks × 15.0s mean per block)"
    assert field(text, "pruner") == "wanda, pattern 2:4"
    assert field(text, "method") == "masklora (32 steps, lr 0.0005, rank 16)"
    assert field(text, "calib") == "self, 128 × 2048 tokens"
    assert field(text, "seed") == "7, dtype bfloat16"
    assert field(text, "quality") == "mean sparsity 0.5000, mean mse 0.002 → 0.001 (before → after reconstruction)"


def test_resume_point_counts_the_blocks_written_after_the_checkpoint(tmp_path):
    manifest = synthetic_job(tmp_path, n_blocks=6, seconds=[10.0, 20.0, 30.0], elapsed=60.0)
    assert field(describe_job(tmp_path), "resume") == (
        "at block 1 of 6 (no activation checkpoint yet; 3 written blocks computed again)"
    )
    manifest.set_stream_checkpoint(1, "state/streams-after-00001.safetensors", "0" * 64)
    manifest.save(tmp_path)
    assert field(describe_job(tmp_path), "resume") == (
        "at block 3 of 6 (streams checkpointed after block 2; 1 written block computed again)"
    )


def test_not_started_job(tmp_path):
    synthetic_job(tmp_path, n_blocks=4, seconds=[], elapsed=0.0)
    text = describe_job(tmp_path)
    assert field(text, "state").startswith("not started")
    assert field(text, "blocks") == "0 / 4 done"
    assert field(text, "time left").startswith("unknown")
    with pytest.raises(AssertionError):
        field(text, "quality")


def test_running_job_shows_the_lock_holder(tmp_path):
    synthetic_job(tmp_path, n_blocks=4, seconds=[3.0], elapsed=3.0)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))
    assert field(describe_job(tmp_path), "state") == f"in progress (running: pid {os.getpid()} holds the lock)"

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a pid that no longer exists: a killed run's lock file
    (tmp_path / LOCK_NAME).write_text(json.dumps({**record, "pid": child.pid}))
    assert field(describe_job(tmp_path), "state").startswith("in progress, interrupted")


@pytest.mark.parametrize(("seconds", "shown"), [(0, "0s"), (42.4, "42s"), (185, "3m 05s"), (7380, "2h 03m")])
def test_format_duration(seconds, shown):
    assert format_duration(seconds) == shown
