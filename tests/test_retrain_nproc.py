"""Model-level retraining from the command line under data parallelism: ``--nproc 2`` (2 gloo ranks via torchrun).

``FLAGS`` take 4 windows a step in micro-batches of 2: one process sums the gradients of its two
micro-batches, each of the 2 ranks computes one of them and the all-reduce adds the two. Float
addition of two terms is commutative, so the merged weights, the loss curves and the written bytes
are those of one process exactly (no tolerance); the held-out loss is computed whole on every rank.
Only the fingerprint's ``world_size`` differs between the two reports.
"""

from __future__ import annotations

import json

import pytest

from reconstruct.modelio.output import REPORT_NAME, STATE_DIR
from reconstruct.parallel import distributed
from reconstruct.retrain.checkpoint import CHECKPOINT_NAME
from reconstruct.jobs.retrain_job import MANIFEST_NAME, check_batch_split
from reconstruct.reporting.status import describe_job
from test_retrain_cli import (
    comparable_report, model_files, run_cli, run_job_cli,
)

WORLD = 2
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch):
    """The commands start their own torchrun; no rank variables leak in from the test process."""
    for name in LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)


def _without_world_size(report: dict) -> dict:
    assert report["job"]["fingerprint"].pop("world_size") in (1, WORLD)
    return report


@pytest.fixture(scope="module")
def single(pruned_llama, small_calib_file, tmp_path_factory):
    """``reconstruct retrain`` in one process: the reference."""
    out = tmp_path_factory.mktemp("retrain-one") / "out"
    done = run_cli(out, pruned_llama, small_calib_file)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_retrain_with_two_processes_killed_and_rerun_writes_the_bytes_of_one(single, pruned_llama, small_calib_file,
                                                                              tmp_path):
    out = tmp_path / "out"
    killed = run_cli(out, pruned_llama, small_calib_file, "retrain-step:3", "--nproc", str(WORLD))
    assert killed.returncode != 0, killed.stderr[-3000:]  # torchrun: a rank was killed
    assert not (out / REPORT_NAME).exists() and (out / STATE_DIR / CHECKPOINT_NAME).is_file()
    resumed = run_cli(out, pruned_llama, small_calib_file, None, "--nproc", str(WORLD))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after step 2" in resumed.stderr  # killed before step 3 was saved
    assert resumed.stdout.count("wrote ") == 1  # rank 0 alone reports
    assert json.loads((out / REPORT_NAME).read_text())["job"]["fingerprint"]["world_size"] == WORLD
    assert model_files(out) == model_files(single)
    assert _without_world_size(comparable_report(out)) == _without_world_size(comparable_report(single))
    assert json.loads((out / STATE_DIR / MANIFEST_NAME).read_text())["finished"]
    assert not list(out.glob("reconstruct-rank*"))  # rank 1's scratch is never in --out
    assert "retrain:    step 4 of 4" in describe_job(out)


def test_run_with_retrain_steps_and_two_processes_finishes(tiny_model_dir, small_calib_file, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    done = run_job_cli(out, tiny_model_dir("llama"), small_calib_file, None, "--nproc", str(WORLD))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["world_size"] == WORLD
    assert report["retrain"]["steps"] == 3 and len(report["retrain"]["loss_curve"]) == 3
    assert not (out / STATE_DIR / "retrained").exists()
    weights = [value for path in sorted(out.glob("model-*.safetensors"))
               for key, value in load_file(path).items() if key.endswith("proj.weight")]
    assert len(weights) == 7 * len(report["blocks"])  # q, k, v, o, gate, up, down of every block
    assert all(float((weight == 0).float().mean()) >= 0.5 for weight in weights)  # the zeros stayed zero
    assert "retrain:    finished (3 of 3 steps)" in describe_job(out)


def test_a_batch_smaller_than_the_processes_is_refused_naming_the_flag(monkeypatch):
    monkeypatch.setattr(distributed, "world", lambda: distributed.World(0, 3))
    with pytest.raises(ValueError, match="--batch 2 is fewer than the 3 processes"):
        check_batch_split(2, "--batch")
    check_batch_split(3, "--batch")


def test_the_relaunched_command_line_parses_to_the_same_options_without_nproc():
    from reconstruct.cli import parse_args
    from reconstruct.cli.retrain import relaunch_command

    given = ["--data", "text.txt", "--out", "o", "--lr", "0.1", "--allow-dense", "--method", "masklora", "-v",
             "--nproc", "2"]
    params = parse_args("retrain", given)
    command, *flags = relaunch_command(params)
    assert command == "retrain" and "--nproc" not in flags
    assert parse_args("retrain", flags) == {**params, "nproc": 1}
