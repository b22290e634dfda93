"""Resumable, crash-safe jobs, end to end through the command line.

Every run is a real ``python -m reconstruct run`` subprocess on a tiny LLaMA (3 blocks, 8 × 32
calibration tokens). ``RECONSTRUCT_CRASH_AT`` makes a run SIGKILL itself at a chosen instant; the same
command without it must then resume at the first unfinished block and produce the same bytes as an
uninterrupted reference run. Runs use one intra-op thread: faster on a busy 2-core box, and every
run of the module then computes in the same order.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from forked_cli import run_reconstruct
from reconstruct.faults import CRASH_ENV
from reconstruct.state.lock import LOCK_NAME
from reconstruct.state.manifest import DONE, MANIFEST_NAME, Manifest, verify_block_files
from reconstruct.modelio.output import REPORT_NAME, STATE_DIR, shard_name

REPO = Path(__file__).resolve().parents[1]
SCHEDULE_EARLY = True  # conftest: many whole jobs, so this module starts first
ARCH = "llama"
RUN_TIMEOUT_S = 240
CALIB_CHARS = 50_000  # enough text for 8 × 32-token windows; the whole file costs ~1 s of tokenizing a run
# Fields of reconstruct.json that measure the run rather than the result.
VOLATILE_REPORT_KEYS = ("elapsed_seconds", "peak_rss_mb", "peak_gpu_mb", "host_memory_total_mb", "seconds_this_session",
                        "io")
# Per-block fields that describe the run: the block's time, its compute / IO split and whether its IO overlapped.
VOLATILE_BLOCK_KEYS = ("seconds", "compute_seconds", "read_wait_seconds", "write_wait_seconds", "read_seconds",
                       "write_seconds", "checkpoint_seconds", "overlap")
BLOCK_LOG = re.compile(r"reconstruct\.jobs\.run_job: block (\d+)/(\d+):")  # one line per computed block
DEFAULT_FLAGS = {  # the job under test; a test overrides single flags by name
    "n_samples": "8",
    "seq_len": "32",
    "device": "cpu",
    "pruner": "sparsegpt",
    "method": "bias-ln",
    "recon_steps": "4",
    "checkpoint_every": "1",  # the tests below expect a checkpoint after every block
    # a revert by the model-level check rewrites finished blocks at the end, by design; its own
    # resume (and a damaged block of a reverted job) is tested in test_model_check.py
    "model_check": "off",
}


# --------------------------------------------------------------------------- helpers
WITHOUT_MATPLOTLIB = REPO / "tests" / "support" / "without_matplotlib"  # runs that need no report.png


class Job:
    """Builds and runs ``reconstruct run`` commands for one model and calibration text.

    ``figures=False`` runs without matplotlib (no ``report.png``: the comparisons here skip it anyway,
    ``test_report`` draws it), which saves a quarter of a tiny run's CPU.
    """

    def __init__(self, model: Path, calib: Path, figures: bool = True):
        self.model = model
        self.calib = calib
        self.figures = figures
        self.n_blocks = json.loads((model / "config.json").read_text())["num_hidden_layers"]
        self.n_shards = self.n_blocks + 1  # one shard per block + one for the tensors outside them

    def shard(self, block: int) -> str:
        """File name of a block's shard in the output folder."""
        return shard_name(block, self.n_shards)

    def args(self, out: Path, *extra: str, **flags: str) -> list[str]:
        """Command-line arguments after ``reconstruct``; ``flags`` override DEFAULT_FLAGS by name."""
        chosen = {**DEFAULT_FLAGS, **{k: str(v) for k, v in flags.items()}}
        args = ["run", "--model", str(self.model), "--calib", str(self.calib), "--out", str(out)]
        for name, value in chosen.items():
            args += [f"--{name.replace('_', '-')}", value]
        return args + list(extra)

    def run(self, out: Path, *extra: str, crash: str | None = None, fresh: bool = False,
            **flags: str) -> subprocess.CompletedProcess:
        """Run the job in a process of its own (``forked_cli``); ``crash`` sets RECONSTRUCT_CRASH_AT,
        ``fresh`` starts a new interpreter instead of forking a pre-imported one."""
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
        if not self.figures:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(WITHOUT_MATPLOTLIB), env.get("PYTHONPATH")]))
        env.pop(CRASH_ENV, None)
        if crash is not None:
            env[CRASH_ENV] = crash
        return run_reconstruct(self.args(out, *extra, **flags), env=env, cwd=REPO, timeout=RUN_TIMEOUT_S, fresh=fresh)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Assert a run exited 0; show its stderr otherwise."""
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-4000:]}"
    return result


def crashed(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Assert a run died by SIGKILL (its crash point was reached)."""
    assert result.returncode == -signal.SIGKILL, f"expected SIGKILL, got exit {result.returncode}\n{result.stderr[-4000:]}"
    return result


def refused(result: subprocess.CompletedProcess) -> str:
    """Assert a run exited 2 with exactly one ``error:`` line and no traceback; return that line."""
    assert result.returncode == 2, f"expected exit 2, got {result.returncode}\n{result.stderr[-4000:]}"
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def computed_blocks(result: subprocess.CompletedProcess) -> list[int]:
    """0-based indices of the blocks a run computed, from its log."""
    return [int(m.group(1)) - 1 for m in BLOCK_LOG.finditer(result.stderr)]


def comparable_report(path: Path) -> dict:
    """``reconstruct.json`` without the fields that measure time and memory."""
    report = json.loads(path.read_text())
    for key in VOLATILE_REPORT_KEYS:
        report.pop(key, None)
    for block in report.get("blocks", []):
        for key in VOLATILE_BLOCK_KEYS:
            block.pop(key, None)
    return report


TIMED_FILES = ("report.md",)


def result_files(folder: Path) -> list[str]:
    """The files a user gets: everything visible except the resume record and the figures (drawn by fresh
    interpreters, not by forked runs: ``tests/support/figures.py``)."""
    return sorted(p.name for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name != MANIFEST_NAME and p.suffix != ".png")


def assert_same_output(out: Path, reference: Path) -> None:
    """``out`` holds a finished job whose files equal the reference's, byte for byte."""
    assert result_files(out) == result_files(reference)
    assert any(name.startswith("model-") for name in result_files(reference))
    for name in result_files(reference):
        if name == REPORT_NAME:
            assert comparable_report(out / name) == comparable_report(reference / name)
        elif name in TIMED_FILES:
            continue  # human-readable summaries that print the run's time and memory
        else:
            assert (out / name).read_bytes() == (reference / name).read_bytes(), f"{name} differs from the reference"
    assert not [p for p in out.rglob("*.reconstruct-tmp")], "a temp file of an interrupted write was left behind"
    manifest = Manifest.load(out)
    assert manifest is not None and manifest.finished and manifest.stream_checkpoint is None
    assert not (out / LOCK_NAME).exists(), "the lock file outlived the run"


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file below ``folder`` → (inode, mtime, size, sha of bytes): detects any rewrite."""
    import hashlib

    return {
        str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size,
                                     hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def file_identity(path: Path) -> tuple[int, int]:
    """(inode, mtime): changes whenever an atomic write replaces the file."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def flip_byte(path: Path, from_end: int = 64) -> None:
    """Invert one byte of the tensor data near the end of a file (the header stays valid)."""
    data = bytearray(path.read_bytes())
    data[-from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_lock(out: Path, pid: int) -> None:
    """A lock file as a reconstruct process with ``pid`` on this host writes it."""
    record = {"pid": pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00"}
    (out / LOCK_NAME).write_text(json.dumps(record, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def job(tiny_model_dir, calib_file, tmp_path_factory) -> Job:
    """The tiny LLaMA and the head of the WikiText-2 validation text."""
    text = calib_file.read_text(encoding="utf-8")[:CALIB_CHARS]
    calib = tmp_path_factory.mktemp("calib") / "valid-head.txt"
    calib.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")
    return Job(tiny_model_dir(ARCH), calib, figures=False)


@pytest.fixture(scope="module")
def reference(job, tmp_path_factory) -> Path:
    """Output folder of one uninterrupted run of the job, in a fresh interpreter (``forked_cli``: the
    runs compared with it are forked, so each comparison spans two interpreters)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = ok(job.run(out, fresh=True))
    assert computed_blocks(result) == list(range(job.n_blocks))
    return out


@pytest.fixture(scope="module")
def crashed_before_last_block(job, tmp_path_factory) -> Path:
    """A job killed once the last block was computed, before its write (in the writer thread, after
    every earlier block's): all blocks but the last done, the activation checkpoint after the one before the last."""
    out = tmp_path_factory.mktemp("crashed") / "out"
    crashed(job.run(out, crash=f"writer:{job.n_blocks - 1}"))
    manifest = Manifest.load(out)
    assert [r.status == DONE for r in manifest.blocks] == [True] * (job.n_blocks - 1) + [False]
    assert manifest.stream_checkpoint["after_block"] == job.n_blocks - 2
    return out


def copy_job(source: Path, destination: Path) -> Path:
    """A copy of an output folder (file times kept)."""
    shutil.copytree(source, destination)
    return destination


# --------------------------------------------------------------------------- crash and resume
# (crash point, blocks recorded done when the process dies). The shard of block 1 is model-00002.
# Manifest saves of a 3-block job: 1 new job; per block b < last: checkpoint saved, then block
# done; last block done; 7 = the save that marks the job finished (all files already written).
CRASH_CASES = [
    ("statistics:0", 0),
    ("statistics:1", 1),
    ("reconstruction:1", 1),
    ("write:{shard1}", 1),  # block 1's temp file written, not renamed
    ("write:reconstruct-manifest.json@4", 1),  # block 1 written, its checkpoint written, manifest not saved
    ("write:streams-after-00001.safetensors", 1),  # block 1 written, its checkpoint not renamed
    ("write:reconstruct-manifest.json@7", 3),  # every output file written, "finished" not saved
]


# Points reached in the loop's own thread: with the overlap on, the write of the block before may
# still be in flight when they are reached, so that block may not be done yet.
LOOP_THREAD_POINTS = ("statistics:", "reconstruction:")


@pytest.mark.parametrize("overlap", ["--overlap", "--no-overlap"])
@pytest.mark.parametrize(("point", "done_at_crash"), CRASH_CASES, ids=[c[0] for c in CRASH_CASES])
def test_crash_then_resume_gives_identical_output(job, reference, tmp_path, point, done_at_crash, overlap):
    out = tmp_path / "out"
    point = point.format(shard1=job.shard(1))
    crashed(job.run(out, overlap, crash=point))

    manifest = Manifest.load(out)
    done = [r.index for r in manifest.blocks if r.status == DONE]
    if overlap == "--overlap" and point.startswith(LOOP_THREAD_POINTS) and done_at_crash and len(done) < done_at_crash:
        done_at_crash -= 1  # the block written behind was still in flight
    assert done == list(range(done_at_crash)), f"crash at {point} left blocks {done} done"
    if done_at_crash == job.n_blocks:
        resume_from = job.n_blocks  # nothing left to compute, only the finishing touches
    elif manifest.stream_checkpoint is not None:
        resume_from = manifest.stream_checkpoint["after_block"] + 1
    else:
        resume_from = 0
    assert resume_from == done_at_crash
    untouched = {i: file_identity(out / job.shard(i)) for i in range(resume_from)}

    resumed = ok(job.run(out, overlap))

    assert_same_output(out, reference)
    assert computed_blocks(resumed) == list(range(resume_from, job.n_blocks)), resumed.stderr
    if 0 < resume_from < job.n_blocks:
        assert f"resuming at block {resume_from + 1} of {job.n_blocks}" in resumed.stderr  # numbered from 1
    for index, identity in untouched.items():
        assert file_identity(out / job.shard(index)) == identity, f"finished block {index} was rewritten"
    if done_at_crash:
        assert "taking over the lock" in resumed.stderr  # the killed run's lock file was stale


@pytest.mark.parametrize(("every", "crash_block", "resume_from"), [("2", 1, 0), ("auto", 2, 2)])
def test_blocks_after_the_last_checkpoint_are_recomputed_identically(job, reference, tmp_path, every, crash_block,
                                                                      resume_from):
    # every 2: block 0 is written but no checkpoint follows it, so the resume recomputes it;
    # auto: a tiny model's checkpoints are cheap, so there is one after every block.
    out = tmp_path / "out"
    crashed(job.run(out, crash=f"writer:{crash_block}", checkpoint_every=every))  # every earlier write done
    manifest = Manifest.load(out)
    assert [r.index for r in manifest.blocks if r.status == DONE] == list(range(crash_block))
    checkpoint = manifest.stream_checkpoint
    assert (checkpoint["after_block"] + 1 if checkpoint else 0) == resume_from
    resumed = ok(job.run(out, checkpoint_every=every))
    assert computed_blocks(resumed) == list(range(resume_from, job.n_blocks)), resumed.stderr
    assert_same_output(out, reference)


def test_crash_before_the_first_manifest_then_rerun(job, reference, tmp_path):
    out = tmp_path / "out"
    crashed(job.run(out, crash="write:reconstruct-manifest.json@1"))
    assert Manifest.load(out) is None and (out / LOCK_NAME).exists()
    ok(job.run(out))
    assert_same_output(out, reference)


def test_same_job_twice_gives_identical_bytes(job, reference, tmp_path):
    other = tmp_path / "other"
    ok(job.run(other))
    shards = [name for name in result_files(reference) if name.startswith("model-")]
    assert len(shards) == job.n_shards
    for name in shards:
        assert (other / name).read_bytes() == (reference / name).read_bytes(), name
    assert_same_output(other, reference)


# --------------------------------------------------------------------------- a different job
def test_changed_job_is_refused_and_force_starts_over(job, reference, tmp_path):
    out = copy_job(reference, tmp_path / "out")
    before = snapshot(out)

    error = refused(job.run(out, seed=1, recon_steps=3))
    assert "holds a different job" in error
    assert "--seed: 0 (on disk) vs 1 (now)" in error  # flags, not fingerprint fields
    assert "--recon-steps: 4 (on disk) vs 3 (now)" in error
    assert "method.steps" not in error
    assert "--force" in error
    assert snapshot(out) == before, "a refused run changed the folder"

    forced = ok(job.run(out, "--force", seed=1, recon_steps=3))
    assert computed_blocks(forced) == list(range(job.n_blocks))
    fresh = ok(job.run(tmp_path / "fresh", seed=1, recon_steps=3, fresh=True))
    assert computed_blocks(fresh) == list(range(job.n_blocks))
    assert_same_output(out, tmp_path / "fresh")
    assert (out / job.shard(0)).read_bytes() != (reference / job.shard(0)).read_bytes()


# --------------------------------------------------------------------------- damaged files
def test_corrupted_block_of_finished_job_is_recomputed(job, reference, tmp_path):
    out = copy_job(reference, tmp_path / "out")
    flip_byte(out / job.shard(1))

    result = ok(job.run(out))

    assert f"block 2 of {job.n_blocks}: file {job.shard(1)} is missing or damaged" in result.stderr
    assert 1 in computed_blocks(result)
    assert_same_output(out, reference)


def test_truncated_block_after_crash_is_recomputed(job, reference, crashed_before_last_block, tmp_path):
    out = copy_job(crashed_before_last_block, tmp_path / "out")
    block = out / job.shard(0)
    block.write_bytes(block.read_bytes()[: block.stat().st_size // 2])

    result = ok(job.run(out))

    assert f"block 1 of {job.n_blocks}: file {job.shard(0)} is missing or damaged" in result.stderr
    assert computed_blocks(result) == list(range(job.n_blocks))  # the streams into block 0 are gone
    assert_same_output(out, reference)


def test_corrupted_activation_checkpoint_is_rebuilt(job, reference, crashed_before_last_block, tmp_path):
    out = copy_job(crashed_before_last_block, tmp_path / "out")
    checkpoints = sorted((out / STATE_DIR).glob("streams-after-*.safetensors"))
    assert len(checkpoints) == 1
    flip_byte(checkpoints[0], from_end=1000)

    result = ok(job.run(out))

    assert "activation checkpoint" in result.stderr and "damaged" in result.stderr
    assert computed_blocks(result) == list(range(job.n_blocks))
    assert_same_output(out, reference)


def test_damaged_manifest_is_refused_and_force_starts_over(job, reference, tmp_path):
    out = copy_job(reference, tmp_path / "out")
    manifest = out / MANIFEST_NAME
    manifest.write_bytes(manifest.read_bytes()[:100])
    error = refused(job.run(out))
    assert "is damaged" in error and "--force" in error
    ok(job.run(out, "--force"))
    assert_same_output(out, reference)


# --------------------------------------------------------------------------- the lock
def test_stale_lock_of_dead_process_is_taken_over(job, reference, crashed_before_last_block, tmp_path):
    out = copy_job(crashed_before_last_block, tmp_path / "out")
    pid = dead_pid()
    write_lock(out, pid)

    result = ok(job.run(out))

    assert f"pid {pid}" in result.stderr and "the process is gone" in result.stderr
    assert computed_blocks(result) == [job.n_blocks - 1]
    assert_same_output(out, reference)


HOLD_LOCK = """
import fcntl, json, os, socket, sys, time
path = sys.argv[1]
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.ftruncate(fd, 0)
os.pwrite(fd, (json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "x"}) + "\\n").encode(), 0)
print("locked", flush=True)
time.sleep(60)
"""


def test_live_lock_holder_is_refused(job, crashed_before_last_block, tmp_path):
    out = copy_job(crashed_before_last_block, tmp_path / "out")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = {k: v for k, v in snapshot(out).items() if k != LOCK_NAME}

        error = refused(job.run(out))

        assert f"pid {holder.pid}" in error and "another reconstruct process" in error
        assert {k: v for k, v in snapshot(out).items() if k != LOCK_NAME} == before
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid  # the holder's lock is intact
    finally:
        holder.kill()
        holder.wait()


def test_lock_naming_a_live_pid_without_the_kernel_lock_is_taken_over(job, reference, tmp_path):
    """The kernel lock (flock) decides, not the pid: a lock file left by a killed run whose pid now
    belongs to an unrelated live process (pid reuse) must not block the folder forever."""
    out = copy_job(reference, tmp_path / "out")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        write_lock(out, sleeper.pid)
        result = ok(job.run(out))
        assert f"pid {sleeper.pid}" in result.stderr and "does not hold the lock" in result.stderr
        assert "already holds this finished job" in result.stderr
        assert not (out / LOCK_NAME).exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# --------------------------------------------------------------------------- a finished job
def test_finished_job_rerun_does_nothing(job, tmp_path):
    out = tmp_path / "out"
    ok(job.run(out))  # not a copy of the reference: a copied file has a new inode and ctime, so it is re-hashed
    before = snapshot(out)

    # Dies if it re-reads a block file: unchanged files are trusted by their recorded stat.
    result = ok(job.run(out, crash=f"verify:{job.shard(0)}"))

    assert "already holds this finished job" in result.stderr
    assert computed_blocks(result) == []
    assert snapshot(out) == before, "re-running a finished job touched its files"


# --------------------------------------------------------------------------- full or read-only disk
@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 400 KiB tmpfs: room for the calibration tokens, block 0 and its checkpoint, not block 1."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); "
                    "test_disk_full_in_process covers the same path")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_disk_full_then_read_only_keeps_last_good_state(job, reference, tiny_tmpfs, tmp_path):
    out = tiny_tmpfs / "out"

    error = refused(job.run(out))

    assert "no space left" in error.lower()
    manifest = Manifest.load(out)
    done = [r.index for r in manifest.blocks if r.status == DONE]
    assert done and not manifest.finished
    assert verify_block_files(manifest, out) == [], "a finished block's file was damaged"
    assert not list(out.rglob("*.reconstruct-tmp")), "the failed write left its temp file"
    assert not (out / LOCK_NAME).exists()
    before = snapshot(out)

    subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True, capture_output=True)
    error = refused(job.run(out))
    assert "read-only" in error.lower()
    assert snapshot(out) == before

    moved = copy_job(out, tmp_path / "moved")
    resumed = ok(job.run(moved))
    assert computed_blocks(resumed) == list(range(len(done), job.n_blocks))
    assert_same_output(moved, reference)


def test_disk_full_in_process(job, reference, tmp_path, monkeypatch):
    """ENOSPC on a block's rename, simulated in process: exit 2, one line, the previous state intact."""
    import torch
    from typer.testing import CliRunner

    from cli import app

    out = tmp_path / "out"
    failing = job.shard(1)
    real_replace = os.replace

    def replace(source, destination, *args, **kwargs):
        if Path(destination).name == failing:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(source))
        return real_replace(source, destination, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess runs, so block 0 is bit-identical to the reference
    try:
        result = CliRunner().invoke(app, job.args(out))
    finally:
        torch.set_num_threads(threads)
        monkeypatch.undo()

    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no space left" in errors[0] and failing in errors[0], result.stderr
    manifest = Manifest.load(out)
    assert [r.status for r in manifest.blocks] == [DONE] + ["pending"] * (job.n_blocks - 1)
    assert verify_block_files(manifest, out) == []
    assert not (out / failing).exists() and not list(out.rglob("*.reconstruct-tmp"))
    assert not (out / LOCK_NAME).exists()

    resumed = ok(job.run(out))
    assert computed_blocks(resumed) == list(range(1, job.n_blocks))
    assert_same_output(out, reference)


# --------------------------------------------------------------------------- the reconstruction guard
GUARD_FLAGS = {"lr": "50", "recon_steps": "8", "recon_eval_every": "4"}  # a diverging repair the guard undoes


@pytest.fixture(scope="module")
def guard_reference(job, tmp_path_factory) -> Path:
    """Output folder of one uninterrupted run whose guard undoes repairs (a fresh interpreter, as ``reference``)."""
    reference = tmp_path_factory.mktemp("guard-reference") / "out"
    ok(job.run(reference, fresh=True, **GUARD_FLAGS))
    return reference


@pytest.mark.parametrize("point", ["reconstruction:1", "statistics:2"])
def test_resume_with_the_guard_undoing_repairs_gives_identical_output(job, guard_reference, tmp_path, point):
    reference = guard_reference
    decisions = [record.stats["recon_kept"] for record in Manifest.load(reference).blocks]
    assert False in decisions  # the manifest records each block's decision
    out = tmp_path / "out"
    crashed(job.run(out, crash=point, **GUARD_FLAGS))
    ok(job.run(out, **GUARD_FLAGS))
    assert_same_output(out, reference)
    assert [record.stats["recon_kept"] for record in Manifest.load(out).blocks] == decisions
