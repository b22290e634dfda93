"""``python -m reconstruct ARGS`` as a real process, without paying its imports each time.

A tiny job spends about 5 s of CPU importing torch, transformers and the tool, and about 1 s on its
work; the suite runs well over a hundred such processes. ``run_reconstruct`` gives each one to a
fork server (``tests/support/fork_server.py``): a process that imported all that once, with the same
environment and working directory, and forks a child per run. The child is a separate process with
its own pid, streams, environment and arguments, so what the tests check of a subprocess still holds:
a crash point SIGKILLs it (exit -9), it takes and leaves the lock as its own pid, its stderr is
captured. It is not a fresh interpreter in four ways: modules are imported before its environment is
set (so a server serves one environment, less ``RUNTIME_ENV``, the variables the tool reads while it
runs), the objects those imports made are frozen out of the garbage collector (``gc.freeze``: walking
them would copy the inherited heap page by page), every child shares the server's string-hash seed, and
it draws the report's figures only where the calling test checks them (``tests/support/figures.py``). The tests that compare the bytes of
two runs therefore keep one side a fresh ``subprocess`` (``fresh=True``), so an output that depended
on hash order or on unseeded randomness would still differ.

Where the server cannot start (no ``fork``, or an import started a thread), runs fall back to
``subprocess.run`` with the same arguments.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from support import figures

REPO = Path(__file__).resolve().parents[1]
SERVER = REPO / "tests" / "support" / "fork_server.py"
# Read by the tool while it runs (never at import), so one server serves every value of them.
RUNTIME_ENV = frozenset({"RECONSTRUCT_CRASH_AT", "RECONSTRUCT_PROGRESS", "RECONSTRUCT_CACHE", "PYTEST_CURRENT_TEST"})
MAX_SERVERS = 4  # one per environment; the oldest goes when a fifth is needed
START_TIMEOUT_S = 300


class _Server:
    def __init__(self, env: dict[str, str], cwd: Path):
        self.process = subprocess.Popen([sys.executable, str(SERVER)], cwd=cwd, env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        hello = self._reply(START_TIMEOUT_S)
        self.ready = bool(hello and hello.get("ready"))

    def _reply(self, timeout: float | None) -> dict | None:
        readable, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not readable:
            return None
        line = self.process.stdout.readline()
        return json.loads(line) if line else None

    def run(self, args: list[str], env: dict[str, str], cwd: Path, timeout: float | None, figures: bool):
        """``(returncode, stdout, stderr)``, or raises ``subprocess.TimeoutExpired`` after killing the child.

        ``figures``: whether the child's job draws the report's figures (``tests/support/figures.py``).
        """
        command = [sys.executable, "-m", "reconstruct", *args]
        with tempfile.TemporaryDirectory(prefix="forked-cli-") as scratch:
            out, err = Path(scratch) / "stdout", Path(scratch) / "stderr"
            request = {"args": args, "env": env, "cwd": str(cwd), "stdout": str(out), "stderr": str(err),
                       "figures": figures}
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            self.process.stdin.flush()
            started = self._reply(60)
            if started is None:
                raise RuntimeError("the fork server did not start the run")
            finished = self._reply(timeout)
            if finished is None:
                os.kill(started["pid"], signal.SIGKILL)
                self._reply(60)
                raise subprocess.TimeoutExpired(command, timeout, out.read_text(errors="replace"),
                                                err.read_text(errors="replace"))
            global forked_cpu_seconds
            forked_cpu_seconds += finished["cpu_seconds"]
            return finished["returncode"], out.read_text(errors="replace"), err.read_text(errors="replace")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


_servers: dict[tuple, _Server] = {}
forked_cpu_seconds = 0.0  # CPU time of every forked run so far (a server's own counts only once it exits)


@atexit.register
def close_servers() -> None:
    """Stop every server and wait for it (conftest calls this at the end of the session, as does atexit)."""
    while _servers:
        _servers.pop(next(iter(_servers))).close()


def _server_for(env: dict[str, str], cwd: Path) -> _Server | None:
    key = (str(cwd), tuple(sorted((k, v) for k, v in env.items() if k not in RUNTIME_ENV)))
    server = _servers.pop(key, None)
    if server is None or server.process.poll() is not None:
        if not hasattr(os, "fork"):
            return None
        while len(_servers) >= MAX_SERVERS:
            _servers.pop(next(iter(_servers))).close()
        server = _Server({k: v for k, v in env.items() if k not in RUNTIME_ENV}, cwd)
    _servers[key] = server  # most recently used last
    return server if server.ready else None


def run_reconstruct(args: list[str], env: dict[str, str] | None = None, cwd: Path = REPO, timeout: float | None = 240,
                    fresh: bool = False) -> subprocess.CompletedProcess:
    """``subprocess.run([python, "-m", "reconstruct", *args], cwd=cwd, env=env, capture_output=True, text=True,
    timeout=timeout)``, forked from a server that already imported everything; ``fresh=True`` starts a new
    interpreter instead (the side a byte comparison keeps fresh: see the module docstring).

    A forked run draws the report's figures only where the calling test checks them, as jobs in the test
    process do (``tests/support/figures.py``); a fresh interpreter draws them as a user's run does.
    """
    args = [str(a) for a in args]
    env = dict(os.environ if env is None else env)
    command = [sys.executable, "-m", "reconstruct", *args]
    server = None if fresh else _server_for(env, Path(cwd))
    if server is None:
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    try:
        returncode, stdout, stderr = server.run(args, env, Path(cwd), timeout, figures.WANTED["on"])
    except subprocess.TimeoutExpired:
        raise
    except BaseException:
        _servers.pop(next(k for k, v in _servers.items() if v is server), None)
        server.close()  # out of step with its replies: the next run gets a new one
        raise
    return subprocess.CompletedProcess(command, returncode, stdout, stderr)
