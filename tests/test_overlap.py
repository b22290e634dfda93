"""Block IO in the background (``reconstruct.loop.overlap``): same bytes, same durability, bounded memory.

- Byte identity with the overlap on and off: every pruner with one method and every method with one
  pruner on the tiny LLaMA, one job each on OPT and GPT-2, and one with disk-tier streams (its
  checkpoints are written before the next block starts).
- A SIGKILL inside the writer thread, then a resume: the same bytes as an uninterrupted run.
- A full disk in the background write: the serial run's error line, exit code 2, earlier blocks intact.
- The helpers keep at most one block in flight each way; the planner counts those buffers, and they
  do not grow with the number of blocks.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import threading
from pathlib import Path

import pytest
from transformers import AutoConfig
from typer.testing import CliRunner

from cli import app
from conftest import make_job
from reconstruct.jobs.run_job import run_job
from reconstruct.loop.overlap import TIMING_KEYS, BlockWrite, BlockWriter
from reconstruct.methods import ReconSpec
from reconstruct.modelio.output import REPORT_NAME
from reconstruct import atomic
from reconstruct.atomic import TEMP_SUFFIX, sha256_file
from reconstruct.state.manifest import DONE, Manifest
from test_resume import assert_same_output, computed_blocks, crashed, ok
from test_resume import job, reference  # noqa: F401 (module fixtures: the tiny LLaMA job and its output)

PRUNERS = ("magnitude", "wanda", "sparsegpt", "loraprune")
METHODS = ("none", "bias", "ln", "bias-ln", "masklora", "scalelora")
# (arch, pruner, method, offload): every pruner with one method, every method with one pruner (LLaMA),
# one job each on OPT and GPT-2, and the disk tier (checkpoints written synchronously).
IDENTITY_CASES = sorted(
    {("llama", pruner, "masklora", "auto") for pruner in PRUNERS}
    | {("llama", "wanda", method, "auto") for method in METHODS}
    | {("opt", "sparsegpt", "bias-ln", "auto"), ("gpt2", "wanda", "scalelora", "auto"),
       ("llama", "sparsegpt", "bias-ln", "disk")}
)


def output_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every weight shard, the index and the config (``reconstruct.json`` holds timings)."""
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())
            if path.suffix == ".safetensors" or path.name in ("config.json", "model.safetensors.index.json")}


def tiny_job(model: Path, out: Path, calib: Path, pruner: str, method: str, offload: str = "auto", overlap: bool = True):
    """An in-process CPU job on a tiny model, checkpointing after every block."""
    recon = None if method == "none" else ReconSpec(method=method, steps=4)
    job = make_job(model, out, pruner, calib=calib, recon=recon)
    return dataclasses.replace(job, offload=offload, overlap=overlap, checkpoint_every=1)


@pytest.mark.parametrize(("arch", "pruner", "method", "offload"), IDENTITY_CASES, ids=["-".join(c) for c in IDENTITY_CASES])
def test_overlap_on_and_off_write_the_same_bytes(tiny_model_dir, small_calib_file, tmp_path, arch, pruner, method, offload):
    model = tiny_model_dir(arch)
    reports, hashes = {}, {}
    for overlap in (True, False):
        out = tmp_path / f"overlap-{overlap}"
        reports[overlap] = run_job(tiny_job(model, out, small_calib_file, pruner, method, offload, overlap))
        hashes[overlap] = output_hashes(out)
    n_blocks = AutoConfig.from_pretrained(model).num_hidden_layers
    assert len(hashes[True]) == n_blocks + 3  # every block's shard, the rest's shard, the index, the config
    assert hashes[True] == hashes[False]
    for overlap, report in reports.items():
        assert report["io"]["overlap"] == [overlap] and report["io"]["bound_by"] in ("compute", "reads", "writes")
        assert report["io"]["blocks_timed"] == len(report["blocks"])
        for block in report["blocks"]:
            assert all(block[key] >= 0 for key in TIMING_KEYS) and block["overlap"] is overlap


WRITER_CRASHES = [  # (crash point, blocks done when the process dies); every write runs in the writer thread
    ("writer:1", 1),  # block 1 computed, its write not started (block 2 may be computing)
    ("writer:2", 2),  # the last block's write not started
]  # tests/test_resume.py runs its crash points (temp files, manifest saves) with the overlap on and off


@pytest.mark.parametrize(("point", "done_at_crash"), WRITER_CRASHES, ids=[c[0] for c in WRITER_CRASHES])
def test_kill_in_the_writer_thread_then_resume_gives_identical_output(job, reference, tmp_path, point, done_at_crash):
    out = tmp_path / "out"
    crashed(job.run(out, "--overlap", crash=point))
    manifest = Manifest.load(out)
    assert [r.index for r in manifest.blocks if r.status == DONE] == list(range(done_at_crash))
    resumed = ok(job.run(out, "--overlap"))
    assert computed_blocks(resumed) == list(range(done_at_crash, job.n_blocks)), resumed.stderr
    assert_same_output(out, reference)


def test_a_job_killed_with_the_overlap_resumes_without_it(job, reference, tmp_path):
    """``--overlap`` is not part of the job: a resume may switch it."""
    out = tmp_path / "out"
    crashed(job.run(out, crash="writer:2"))
    ok(job.run(out, "--no-overlap"))
    assert_same_output(out, reference)


def fail_block_write(monkeypatch, file_name: str) -> None:
    """Make every write of ``file_name`` fail with ENOSPC when its temp file is created."""
    real_open = atomic.os.open

    def open_or_fail(path, flags, mode=0o777, **kwargs):
        if Path(path).name.startswith(f".{file_name}."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(atomic.os, "open", open_or_fail)


@pytest.mark.parametrize("overlap", ["--overlap", "--no-overlap"])
def test_full_disk_in_the_background_write_stops_the_job_like_a_serial_run(job, reference, tmp_path, monkeypatch,
                                                                            overlap):
    out = tmp_path / "out"
    fail_block_write(monkeypatch, job.shard(1))
    result = CliRunner().invoke(app, job.args(out, overlap))
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [f"error: no space left to write {out / job.shard(1)}: free space on {out} or choose another --out"]
    assert "Traceback" not in result.output
    manifest = Manifest.load(out)
    assert [r.index for r in manifest.blocks if r.status == DONE] == [0]
    assert sha256_file(out / job.shard(0)) == manifest.blocks[0].sha256  # the block before it is intact
    assert not (out / job.shard(1)).exists() and not list(out.rglob(f"*{TEMP_SUFFIX}"))
    monkeypatch.undo()
    ok(job.run(out))  # the same command with space again finishes the job, bit for bit
    assert_same_output(out, reference)


def test_writer_keeps_one_block_in_flight_and_in_order():
    """``submit`` of block i+1 returns only once block i's writes are done; writes run in order."""
    writer = BlockWriter(background=True)
    release, order = threading.Event(), []

    def first() -> None:
        release.wait(30)
        order.append(0)

    writer.submit(BlockWrite(0, first))
    second_submitted = threading.Event()

    def submit_second() -> None:
        writer.submit(BlockWrite(1, lambda: order.append(1)))
        second_submitted.set()

    thread = threading.Thread(target=submit_second)
    thread.start()
    assert not second_submitted.wait(0.2)  # still waiting for block 0's write
    release.set()
    thread.join(30)
    assert second_submitted.is_set()
    writer.close(failed=False)
    assert order == [0, 1]


def test_writer_raises_the_background_error_at_the_next_hand_over():
    writer = BlockWriter(background=True)

    def no_space() -> None:
        raise atomic.DiskWriteError("no space left to write x", Path("x"), errno.ENOSPC)

    writer.submit(BlockWrite(0, no_space))
    with pytest.raises(atomic.DiskWriteError, match="no space left"):
        writer.submit(BlockWrite(1, lambda: None))
    writer.close(failed=True)


def test_report_names_what_bounds_the_job(finished_job):
    job, report = finished_job("llama", "wanda")
    text = (job.out / "report.md").read_text()
    assert f"bound by {report['io']['bound_by']}" in text
    assert json.loads((job.out / REPORT_NAME).read_text())["io"]["blocks_timed"] == len(report["blocks"])


def test_plan_counts_the_blocks_in_flight_once_whatever_the_depth(tmp_path):
    """With the overlap, the per-block phases hold one more block read ahead, one written behind and a
    copy of the streams for the checkpoint; the same bytes for 48 blocks as for 96."""
    from test_planner import OPT_30B, opt30b_job

    from reconstruct.planner import GIB, MemoryBudget, plan_from_config

    budget = MemoryBudget(device_bytes=80 * GIB, host_bytes=512 * GIB)
    deeper = tmp_path / "config.json"
    deeper.write_text(json.dumps({**json.loads(OPT_30B.read_text()), "num_hidden_layers": 96}))
    extra = {}
    for config in (OPT_30B, deeper):
        on = plan_from_config(opt30b_job("cpu"), config, budget)
        off = plan_from_config(dataclasses.replace(opt30b_job("cpu"), overlap=False), config, budget)
        on_host, off_host = (next(p for p in plan.phases if p.name == "pruning").total("host") for plan in (on, off))
        extra[config] = on_host - off_host
        assert extra[config] == 2 * on.sizes["block"] + on.sizes["n_streams"] * on.sizes["stream"]  # fp16 = stored
    assert extra[OPT_30B] == extra[deeper]


def test_at_most_one_stream_checkpoint_copy_is_held_at_a_time(tiny_model_dir, small_calib_file, tmp_path, monkeypatch):
    """The planner counts one private copy of the streams for the checkpoint being written behind: the
    next block's copy is taken only once that write is done (which also lets ``--checkpoint-every auto``
    decide after the previous checkpoint's time is known)."""
    from reconstruct.jobs.job_state import JobState

    live, most = [0], [0]
    lock = threading.Lock()
    real_snapshot, real_checkpoint = JobState.stream_snapshot, JobState._checkpoint_streams

    def snapshot(self, *args, **kwargs):
        streams = real_snapshot(self, *args, **kwargs)
        if streams is not None:
            with lock:
                live[0] += 1
                most[0] = max(most[0], live[0])
        return streams

    def slow_checkpoint(self, index, streams):
        threading.Event().wait(0.3)  # a slow disk: the next block computes meanwhile
        real_checkpoint(self, index, streams)
        with lock:
            live[0] -= 1

    monkeypatch.setattr(JobState, "stream_snapshot", snapshot)
    monkeypatch.setattr(JobState, "_checkpoint_streams", slow_checkpoint)
    model = tiny_model_dir("llama")
    run_job(tiny_job(model, tmp_path / "out", small_calib_file, "magnitude", "none", offload="cpu"))
    assert most[0] == 1
