"""Data-parallel runs (``reconstruct.parallel.distributed``): 2 gloo processes on the CPU equal one process.

One module-scoped fixture runs every single-process reference in this process, then spawns 2
worker processes once (``torch.multiprocessing``, a gloo group over TCP) that run the same jobs
with the calibration samples split between them. Rank 1 records, with a Python audit hook, every
file-system write it makes under the jobs' folders: there must be none. One more test goes through
the command line (``--nproc 2`` relaunching itself through torchrun).

Tiny LLaMA (3 blocks), 8 × 32 calibration tokens, micro-batch 4: each rank's 4 samples are exactly
one single-process micro-batch, so statistics are the same sums in the same order and pruning-only
runs come out bit-identical. Reconstruction steps take 2 samples, one per slice, so a step's gradient
is the sum of at most 2 per-sample gradients on either side; float addition is commutative, so
every run here is compared bit for bit (no tolerance). The ``uneven-*`` jobs (every method, and
LoRAPrune's warm-up) take one sample a step: every step's batch lies wholly on one rank and the
other holds none of it, yet joins the gradient all-reduce (adding exact zeros).

That is the whole reason for equality (``tolerances.py``'s rule): every sum is made of the same
kernel calls on the same shapes, one thread each, in both runs. A run whose single process put two
windows in one forward where each rank has one (the ``loraprune-model`` stage with micro-batch 4
did) sums one GEMM over 64 tokens against two over 32: other bits, on some CPUs' kernels, and masks
that flip at near-ties. So the model-level stage runs with micro-batch 1 here: one window per
forward on either side, the same per-window gradients, added once.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_job
from support import figures
from tolerances import gamma
from reconstruct.parallel import distributed
from reconstruct.config import ValidationData
from reconstruct.methods import ReconSpec

REPO = Path(__file__).resolve().parents[1]
SCHEDULE_EARLY = True  # conftest: the module fixture runs every job twice, so this module starts first
WORLD = 2
RECON = dict(steps=4, batch_size=2, micro_batch=1, lr=1e-3)  # 2 addends per gradient sum: exact
UNEVEN = dict(RECON, batch_size=1)  # each step's batch on one rank only
JOBS = {  # name → (pruner, reconstruction)
    "magnitude": ("magnitude", None),
    "wanda": ("wanda", None),
    "sparsegpt": ("sparsegpt", None),
    "bias-ln": ("wanda", ReconSpec(method="bias-ln", **RECON)),
    "masklora": ("sparsegpt", ReconSpec(method="masklora", rank=4, **RECON)),
    **{f"uneven-{method}": ("wanda", ReconSpec(method=method, rank=4, allow_dense_merge=method == "lora", **UNEVEN))
       for method in ("bias", "ln", "bias-ln", "masklora", "scalelora", "lora")},
    "uneven-loraprune": ("loraprune", None),  # its warm-up steps take 1 sample each
    "loraprune-model": ("loraprune", None),  # the model-level stage: 2 windows a step, one per rank, one per forward
    "val-data": ("wanda", ReconSpec(method="bias-ln", val_fraction=0.0, **RECON)),  # + VAL_DATA's rows
}
# --recon-val-data: 8 windows after the 8 calibration rows, so rank 0 holds the calibration rows and rank 1
# the validation rows: statistics and gradients are rank 0's sums plus exact zeros, as in one process
VAL_WINDOWS = 8
MODEL_LEVEL = dict(loraprune_objective="model", loraprune_steps=4, loraprune_lr=1e-3)  # the loraprune-model job
MICRO_BATCH = {"loraprune-model": 1}  # windows per forward where a job's single process must not batch 2 (docstring)
RESUMED = "masklora"  # the job the resume tests interrupt at block 1 and finish
INTERRUPT_AT = "reconstruction:1"
STAGE_INTERRUPT_AT = "loraprune-step:3"  # the loraprune-model stage, killed after step 3, before its checkpoint
WRITE_EVENTS = {"os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.truncate", "os.link", "os.symlink",
                "os.chmod", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"}
COPY_EVENTS = {"os.link", "os.symlink", "shutil.copyfile"}  # (source, destination): only the destination is written
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class Interrupted(Exception):
    """Stands in for a kill at a crash point (the state on disk is the same: writes are atomic)."""


def _interrupting(point: str):
    def crash_point(name: str) -> None:
        if name == point:
            raise Interrupted(name)

    return crash_point


def _run(job, interrupt: str | None = None, stage_starts: list[int] | None = None) -> int:
    """``run_job``; returns the block it started from (0 = fresh). ``interrupt`` stops it at that crash point.

    ``stage_starts`` gets the step the model-level LoRAPrune stage resumed after (0 = fresh), if it ran.
    """
    from unittest import mock

    from pruners.loraprune_model import LoRAPruneController
    from reconstruct.jobs import loraprune_stage
    from reconstruct.jobs import run_job as engine
    from reconstruct.loop import pipeline, pruning
    from reconstruct.jobs.job_state import JobState

    starts: list[int] = []
    restore, restore_stage = JobState.restore_streams, LoRAPruneController.restore

    def spy(self, sparse, dense):
        starts.append(restore(self, sparse, dense))
        return starts[-1]

    def stage_spy(self, step, saved):
        if stage_starts is not None:
            stage_starts.append(step)
        restore_stage(self, step, saved)

    with mock.patch.object(JobState, "restore_streams", spy), mock.patch.object(LoRAPruneController, "restore", stage_spy):
        if interrupt is None:
            engine.run_job(job)
        else:
            crash = _interrupting(interrupt)
            with mock.patch.object(pipeline, "crash_point", crash), mock.patch.object(pruning, "crash_point", crash), \
                    mock.patch.object(loraprune_stage, "crash_point", crash), pytest.raises(Interrupted):
                engine.run_job(job)
    return starts[0] if starts else 0  # a kill in the LoRAPrune stage comes before the streams are restored


def _audit_writes(root: Path, log: list):
    """An audit hook appending ``(event, path)`` for every write-like call on a path under ``root``."""
    root = str(root)

    def under(value) -> bool:
        return isinstance(value, (str, bytes, os.PathLike)) and os.fsdecode(os.path.abspath(value)).startswith(root)

    def hook(event, args):
        if event == "open" and len(args) >= 3 and under(args[0]):
            mode, flags = args[1] or "", args[2] or 0
            if any(c in mode for c in "wax+") or flags & WRITE_FLAGS:
                log.append((event, os.fsdecode(args[0])))
        elif event in WRITE_EVENTS and args:
            written = args[1:2] if event in COPY_EVENTS else args[:2]
            if any(under(a) for a in written):
                log.append((event, [os.fsdecode(a) for a in written if under(a)]))

    return hook


def _worker(rank: int, port: int, tasks: list, results: Path) -> None:
    """One of the 2 ranks: run every task (name, job, interrupt, resume-expected) in one gloo group."""
    torch.set_num_threads(1)
    os.environ["TQDM_DISABLE"] = "1"
    figures.draw_only_when(lambda: False)  # as the in-process references: no figure is compared here
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
    writes: list = []
    if rank != 0:
        sys.addaudithook(_audit_writes(results.parent / "dist", writes))
    starts = {}
    stage_starts: dict[str, list[int]] = {}
    for name, job, interrupt in tasks:
        key = f"{name}:{interrupt}"
        try:
            starts[key] = _run(job, interrupt, stage_starts.setdefault(key, []))
        except ValueError as refused:  # resume with another process count
            starts[key] = f"refused: {refused}"
    (results / f"rank{rank}.json").write_text(json.dumps({"writes": writes, "starts": starts,
                                                          "stage_starts": stage_starts}))
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _job(model: Path, out: Path, calib: Path, name: str):
    pruner, recon = JOBS[name]
    job = make_job(model, out, pruner, calib=calib, micro_batch=MICRO_BATCH.get(name, 4), recon=recon)
    if name == "loraprune-model":
        job = dataclasses.replace(job, prune=dataclasses.replace(job.prune, **MODEL_LEVEL))
    if name == "val-data":
        job = dataclasses.replace(job, recon_val_data=ValidationData("self", VAL_WINDOWS))
    return job


@pytest.fixture(scope="module")
def runs(tiny_model_dir, small_calib_file, tmp_path_factory):
    """Single-process references, then one spawn of 2 ranks running the same jobs; returns paths and logs."""
    model, root = tiny_model_dir("llama"), tmp_path_factory.mktemp("distributed")
    single, dist_root, results = root / "single", root / "dist", root / "results"
    results.mkdir()
    for name in JOBS:
        assert _run(_job(model, single / name, small_calib_file, name)) == 0
    # resume with another world size: 1 process stops at block 1, 2 finish ...
    assert _run(_job(model, dist_root / "resume-1to2", small_calib_file, RESUMED), INTERRUPT_AT) == 0
    tasks = [(name, _job(model, dist_root / name, small_calib_file, name), None) for name in JOBS]
    resume = _job(model, dist_root / "resume-2to2", small_calib_file, RESUMED)
    stage = dataclasses.replace(_job(model, dist_root / "resume-stage", small_calib_file, "loraprune-model"),
                                checkpoint_every=1)
    tasks += [
        ("resume-2to2", resume, INTERRUPT_AT), ("resume-2to2", resume, None),
        ("resume-stage", stage, STAGE_INTERRUPT_AT), ("resume-stage", stage, None),
        ("resume-1to2", _job(model, dist_root / "resume-1to2", small_calib_file, RESUMED), None),
        ("resume-2to1", _job(model, dist_root / "resume-2to1", small_calib_file, RESUMED), INTERRUPT_AT),
    ]
    torch.multiprocessing.spawn(_worker, args=(_free_port(), tasks, results), nprocs=WORLD, join=True)
    # ... and 2 processes stop at block 1, 1 may not finish
    with pytest.raises(ValueError) as resumed_alone:
        _run(_job(model, dist_root / "resume-2to1", small_calib_file, RESUMED))
    ranks = [json.loads((results / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return {"single": single, "dist": dist_root, "ranks": ranks, "resumed_alone": str(resumed_alone.value)}


def _blocks(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(out.glob("model-*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _files(out: Path) -> set[str]:
    """Every file under ``out`` but the figures (no job here draws them: ``tests/support/figures.py``)."""
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.suffix != ".png"}


def _assert_same_model(got: Path, want: Path) -> None:
    a, b = _blocks(got), _blocks(want)
    assert a.keys() == b.keys() and a
    for name in b:
        assert torch.equal(a[name] == 0, b[name] == 0), f"{name}: keep mask differs from the single-process run"
        assert torch.equal(a[name], b[name]), f"{name}: differs from the single-process run"


# --------------------------------------------------------------------------- 2 processes = 1 process
@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt", "loraprune-model"])
def test_pruning_masks_equal_single_process(runs, name):
    _assert_same_model(runs["dist"] / name, runs["single"] / name)


@pytest.mark.parametrize("name", [name for name in JOBS if name.startswith("uneven-")])
def test_a_rank_holding_none_of_a_step_s_batch_still_gives_single_process_bytes(runs, name):
    _assert_same_model(runs["dist"] / name, runs["single"] / name)


@pytest.mark.parametrize("name", ["bias-ln", "masklora", "val-data"])
def test_reconstruction_equals_single_process(runs, name):
    _assert_same_model(runs["dist"] / name, runs["single"] / name)
    got = json.loads((runs["dist"] / name / "reconstruct.json").read_text())
    want = json.loads((runs["single"] / name / "reconstruct.json").read_text())
    assert got["world_size"] == WORLD and want["world_size"] == 1
    assert got["job"].get("validation") == want["job"].get("validation")  # --recon-val-data: the same windows
    for mine, theirs in zip(got["blocks"], want["blocks"]):
        # float64 sums of the same (at most 8) per-slice float64 sums in another order, then one division:
        # each within gamma_9 (float64) of the exact mean
        assert mine["mse_after"] == pytest.approx(theirs["mse_after"], rel=2 * gamma(9, torch.float64))
        assert mine["mse_after"] < mine["mse_before"] or mine["recon_kept"] is False  # undone: the pruned block's
        # the guard: the same held-out samples and the same decisions on every rank as in one process
        assert mine["val_before"] == pytest.approx(theirs["val_before"], rel=2 * gamma(9, torch.float64))  # likewise
        assert (mine["recon_kept"], mine["recon_stopped_at"]) == (theirs["recon_kept"], theirs["recon_stopped_at"])


def test_only_rank_zero_writes(runs):
    assert runs["ranks"][1]["writes"] == []  # rank 1: no open-for-write, rename, mkdir, ... under the outputs
    for name in JOBS:
        assert _files(runs["dist"] / name) == _files(runs["single"] / name), name


# --------------------------------------------------------------------------- resume
def test_resume_in_distributed_mode(runs):
    case = "resume-2to2"
    starts = runs["ranks"][0]["starts"]
    assert (starts[f"{case}:{INTERRUPT_AT}"], starts[f"{case}:None"]) == (0, 1)  # interrupted, then resumed
    assert runs["ranks"][1]["starts"][f"{case}:None"] == 1
    _assert_same_model(runs["dist"] / case, runs["single"] / RESUMED)
    assert _files(runs["dist"] / case) == _files(runs["single"] / RESUMED)


def test_model_level_loraprune_stage_resumes_from_its_checkpoint_on_every_rank(runs):
    """A per-weight pattern: rank 1's importance records live in a scratch folder that dies with the session;
    the resumed rank copies rank 0's snapshot, so both continue from the checkpoint of step 2 (one per step;
    the kill came before step 3's) and give one process's bytes."""
    for rank in range(WORLD):
        stage_starts = runs["ranks"][rank]["stage_starts"]
        assert stage_starts[f"resume-stage:{STAGE_INTERRUPT_AT}"] == [0]
        assert stage_starts["resume-stage:None"] == [2], f"rank {rank} did not resume from step 2"
    _assert_same_model(runs["dist"] / "resume-stage", runs["single"] / "loraprune-model")
    assert _files(runs["dist"] / "resume-stage") == _files(runs["single"] / "loraprune-model")


def test_resume_with_another_process_count_is_refused(runs):
    for rank in range(WORLD):  # one process's job, two processes: both ranks refuse with rank 0's message
        refused = runs["ranks"][rank]["starts"]["resume-1to2:None"]
        assert refused.startswith("refused: --nproc: ") and "started with 1 process(es) and this run has 2" in refused
    assert runs["resumed_alone"].startswith("--nproc: ")  # two processes' job, one process
    assert "started with 2 process(es) and this run has 1" in runs["resumed_alone"]


# --------------------------------------------------------------------------- command line
def test_nproc_relaunches_through_torchrun(runs, tiny_model_dir, small_calib_file, tmp_path):
    """``run --nproc 2``: the same job as the in-process bias-ln reference, through torchrun."""
    out = tmp_path / "out"
    spec = JOBS["bias-ln"][1]
    args = [
        "run", "--model", str(tiny_model_dir("llama")), "--calib", str(small_calib_file), "--out", str(out),
        "--n-samples", "8", "--seq-len", "32", "--device", "cpu", "--micro-batch", "4", "--pruner", "wanda",
        "--method", "bias-ln", "--recon-steps", str(spec.steps), "--recon-batch", str(spec.batch_size),
        "--lr", str(spec.lr), "--nproc", str(WORLD), "--model-check", "off",  # as the reference (make_job)
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-m", "reconstruct", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # rank 0 alone reports
    assert "[rank 0]" in done.stderr and "[rank 1] INFO" not in done.stderr  # rank 1 logs warnings only
    assert json.loads((out / "reconstruct.json").read_text())["world_size"] == WORLD
    _assert_same_model(out, runs["single"] / "bias-ln")
    assert _files(out) == _files(runs["single"] / "bias-ln")


# --------------------------------------------------------------------------- helpers, one process
def test_split_is_contiguous_and_covers_every_sample(monkeypatch):
    for size in (1, 2, 3):
        shards = []
        for rank in range(size):
            monkeypatch.setattr(distributed, "world", lambda rank=rank: distributed.World(rank, size))
            shards.append(distributed.split_samples(8))
        assert [(s.start, s.stop) for s in shards] == list(shards[0].bounds)
        assert shards[0].start == 0 and shards[-1].stop == 8
        assert all(a.stop == b.start for a, b in zip(shards, shards[1:]))
        assert max(s.size for s in shards) - min(s.size for s in shards) <= 1
    monkeypatch.setattr(distributed, "world", lambda: distributed.World(0, 3))
    with pytest.raises(ValueError, match="--n-samples 2 is fewer than the 3 processes"):
        distributed.split_samples(2)


def test_helpers_are_no_ops_in_one_process():
    assert distributed.world() == distributed.World(0, 1) and distributed.is_main()
    assert distributed.all_reduce_sum(1.5, 2) == (1.5, 2)
    assert distributed.from_main(lambda: "x") == "x"
    assert distributed.local_shard(5) == distributed.Shard(0, 5, 5, ((0, 5),))
    rows = torch.randn(5, 3)
    assert torch.equal(distributed.gather_rows(rows), rows)
    assert distributed.scatter_rows(rows, distributed.local_shard(5), (3,), rows.dtype) is rows

    def refuse():
        raise ValueError("--gpu-memory: too small")

    with pytest.raises(ValueError, match="--gpu-memory"):
        distributed.agree(refuse)


def test_command_line_for_torchrun_drops_nproc_and_keeps_changed_flags():
    from reconstruct.cli import parse_args
    from reconstruct.cli.job_options import relaunch_command

    params = parse_args("run", ["--pruner", "sparsegpt", "--lr", "0.001", "--sequential", "--out", "o", "--eval", "t.txt",
                                "--nproc", "4", "--verbose"])
    assert relaunch_command(params) == [
        "run", "--pruner", "sparsegpt", "--lr", "0.001", "--sequential", "--out", "o", "--eval", "t.txt", "--verbose",
    ]
