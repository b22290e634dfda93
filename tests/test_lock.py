"""JobLock: one writer per output folder, stale locks taken over, in flock and fallback mode."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from reconstruct.state import lock as lock_module
from reconstruct.state.lock import LOCK_NAME, JobLock


@pytest.fixture(params=["flock", "fallback"])
def mode(request, monkeypatch):
    """Run each test with the kernel lock and with the pid-file fallback."""
    if request.param == "fallback":
        monkeypatch.setattr(lock_module, "fcntl", None)
    elif lock_module.fcntl is None:
        pytest.skip("no fcntl on this platform")
    return request.param


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(out_dir, pid, host=None):
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "host": host or socket.gethostname(), "started": "2024-01-01T00:00:00+00:00"}
    (out_dir / LOCK_NAME).write_text(json.dumps(record))


def _owner(out_dir) -> int:
    return json.loads((out_dir / LOCK_NAME).read_text())["pid"]


def test_lock_file_holds_owner_and_is_removed(tmp_path, mode):
    out = tmp_path / "out"
    with JobLock(out):
        info = json.loads((out / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid()
        assert info["host"] == socket.gethostname()
        assert info["started"]
    assert not (out / LOCK_NAME).exists()
    assert sorted(os.listdir(out)) == []


def test_lock_removed_on_exception(tmp_path, mode):
    with pytest.raises(RuntimeError, match="boom"):
        with JobLock(tmp_path):
            raise RuntimeError("boom")
    assert not (tmp_path / LOCK_NAME).exists()
    with JobLock(tmp_path):  # and can be taken again
        pass


def test_second_lock_in_same_process_refused(tmp_path, mode):
    with JobLock(tmp_path):
        with pytest.raises(ValueError) as info:
            with JobLock(tmp_path):
                pass  # pragma: no cover
        message = str(info.value)
        assert message == (
            f"{tmp_path} is being written by another reconstruct process (pid {os.getpid()}); "
            f"wait for it or choose another --out"
        )
        assert (tmp_path / LOCK_NAME).exists()  # the refused attempt did not remove the holder's lock
    assert not (tmp_path / LOCK_NAME).exists()


def test_live_subprocess_holds_lock(tmp_path, mode):
    script = textwrap.dedent(
        f"""
        import sys, time
        from reconstruct.state import lock
        if {mode == "fallback"!r}:
            lock.fcntl = None
        with lock.JobLock(sys.argv[1]):
            print("locked", flush=True)
            sys.stdin.read()
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"being written by another reconstruct process \(pid {child.pid}\)"):
            with JobLock(tmp_path):
                pass  # pragma: no cover
    finally:
        child.kill()  # like kill -9: no cleanup runs in the child
        child.wait()
    assert _owner(tmp_path) == child.pid  # its lock file is left behind ...
    with JobLock(tmp_path):  # ... and taken over now that it is dead
        assert _owner(tmp_path) == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()


def test_stale_lock_with_dead_pid_taken_over(tmp_path, mode, caplog):
    dead = _dead_pid()
    _write_lock(tmp_path, dead)
    with caplog.at_level(logging.WARNING, logger="reconstruct.state.lock"):
        with JobLock(tmp_path):
            assert _owner(tmp_path) == os.getpid()
    assert f"pid {dead}" in caplog.text and "taking over" in caplog.text
    assert not (tmp_path / LOCK_NAME).exists()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("garbage", [b"", b"{not json", b"\xff\xfe\x00", b'{"pid": "7"}', b"[1, 2]"])
def test_garbage_lock_taken_over(tmp_path, mode, caplog, garbage):
    (tmp_path / LOCK_NAME).write_bytes(garbage)
    with caplog.at_level(logging.WARNING, logger="reconstruct.state.lock"):
        with JobLock(tmp_path):
            assert _owner(tmp_path) == os.getpid()
    if garbage:
        assert "unreadable" in caplog.text
    assert not (tmp_path / LOCK_NAME).exists()


def test_own_pid_left_by_dead_process_taken_over(tmp_path, mode):
    """A restarted container can reuse the dead run's pid; that must not block the resume."""
    _write_lock(tmp_path, os.getpid())
    with JobLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["started"] != "2024-01-01T00:00:00+00:00"


def test_fallback_live_pid_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_module, "fcntl", None)
    _write_lock(tmp_path, os.getppid())  # alive: our parent
    with pytest.raises(ValueError, match=rf"\(pid {os.getppid()}\)"):
        with JobLock(tmp_path):
            pass  # pragma: no cover
    assert _owner(tmp_path) == os.getppid()
    assert os.listdir(tmp_path) == [LOCK_NAME]


def test_fallback_other_host_refused_with_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_module, "fcntl", None)
    _write_lock(tmp_path, 12345, host="elsewhere")
    with pytest.raises(ValueError, match="on host elsewhere.*delete"):
        with JobLock(tmp_path):
            pass  # pragma: no cover


def test_flock_mode_ignores_pid_file_without_kernel_lock(tmp_path, caplog):
    """In flock mode the kernel lock decides: a recorded live pid that holds no lock is stale."""
    if lock_module.fcntl is None:
        pytest.skip("no fcntl on this platform")
    _write_lock(tmp_path, os.getppid())
    with caplog.at_level(logging.WARNING, logger="reconstruct.state.lock"):
        with JobLock(tmp_path):
            assert _owner(tmp_path) == os.getpid()
    assert "pid reused" in caplog.text


def test_flock_unsupported_falls_back(tmp_path, monkeypatch):
    if lock_module.fcntl is None:
        pytest.skip("no fcntl on this platform")
    import errno

    def unsupported(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_module.fcntl, "flock", unsupported)
    with JobLock(tmp_path):
        with pytest.raises(ValueError, match="being written"):
            with JobLock(tmp_path):
                pass  # pragma: no cover
    assert os.listdir(tmp_path) == []


def test_threads_racing_for_stale_lock_never_overlap(tmp_path, mode):
    _write_lock(tmp_path, _dead_pid())
    n = 8
    barrier = threading.Barrier(n)
    guard = threading.Lock()
    state = {"holders": 0, "max": 0, "won": 0, "refused": 0}

    def contender():
        barrier.wait()
        try:
            with JobLock(tmp_path):
                with guard:
                    state["holders"] += 1
                    state["max"] = max(state["max"], state["holders"])
                    state["won"] += 1
                time.sleep(0.02)
                with guard:
                    state["holders"] -= 1
        except ValueError:
            with guard:
                state["refused"] += 1

    threads = [threading.Thread(target=contender) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert state["won"] >= 1 and state["won"] + state["refused"] == n
    assert state["max"] == 1
    assert os.listdir(tmp_path) == []


_RACER = """
import os, sys, time
from reconstruct.state import lock
if sys.argv[3] == "fallback":
    lock.fcntl = None
out, log, start = sys.argv[1], sys.argv[2], float(sys.argv[4])
def note(word):
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, f"{word} {os.getpid()}\\n".encode())
    os.close(fd)
while time.time() < start:
    time.sleep(0.001)
try:
    with lock.JobLock(out):
        note("enter")
        time.sleep(0.05)
        note("exit")
except ValueError:
    note("refused")
"""


def test_processes_racing_for_stale_lock_never_overlap(tmp_path, mode):
    out = tmp_path / "out"
    _write_lock(out, _dead_pid())
    log = tmp_path / "log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    start = time.time() + 1.5
    racers = [
        subprocess.Popen([sys.executable, "-c", _RACER, str(out), str(log), mode, str(start)], env=env)
        for _ in range(6)
    ]
    for racer in racers:
        assert racer.wait(timeout=60) == 0
    events = [line.split()[0] for line in log.read_text().splitlines()]
    assert len(events) == events.count("refused") + 2 * events.count("enter")
    assert events.count("enter") >= 1
    holding = 0
    for event in events:
        holding += {"enter": 1, "exit": -1, "refused": 0}[event]
        assert holding in (0, 1), events
    assert os.listdir(out) == []


def test_release_leaves_foreign_lock(tmp_path, mode):
    held = JobLock(tmp_path)
    held.__enter__()
    os.unlink(tmp_path / LOCK_NAME)
    _write_lock(tmp_path, 4242)  # someone else's lock now (e.g. after a manual delete)
    held.__exit__(None, None, None)
    assert _owner(tmp_path) == 4242
