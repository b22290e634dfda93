"""A pre-imported ``python -m reconstruct``: the server half of ``tests/forked_cli.py``.

Started as a script with the environment and working directory its runs will have. It imports what
a run imports (torch, transformers' modeling files, the tool's own modules; about 5 s of CPU on a
small machine, more than a tiny job's work), starts no thread, then serves requests, one JSON line
each on stdin: ``{"args", "env", "cwd", "stdout", "stderr"}``. For each it forks; the child points
its standard streams at the two files, takes the request's environment, working directory and
arguments, and runs ``reconstruct`` as ``python -m`` runs it (``runpy._run_module_as_main``) at the
top level of this script, so it exits as an interpreter does: exit code, SIGKILL, atexit handlers,
non-daemon threads joined. The server answers ``{"pid": ...}`` at the fork and
``{"returncode": ..., "cpu_seconds": ...}`` at the end (negative: killed by that signal, as
``subprocess`` reports it; the child's user + system CPU time).
"""

from __future__ import annotations

import os
import sys

sys.path[0] = os.getcwd()  # as ``python -m`` starts: the working directory first, not this script's folder

import gc  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import pkgutil  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

# What a run imports, found without naming the tool's modules one by one (they move): every module of
# its packages, the command line, and the modeling files of the families the tests build. An import
# that fails here (matplotlib kept out by PYTHONPATH, an optional extra) fails again in the child, as
# in a fresh interpreter.
PACKAGES = ("reconstruct", "pruners", "calib", "cli")
EXTRA_MODULES = tuple(f"transformers.models.{family}.modeling_{family}" for family in ("llama", "opt", "gpt2", "mistral", "qwen2")) + (
    "safetensors.torch", "matplotlib.figure", "matplotlib.backends.backend_agg",
)


def _warm() -> None:
    for name in PACKAGES:
        try:
            package = importlib.import_module(name)
        except Exception:  # noqa: BLE001 (the child meets the same error, as a fresh run would)
            continue
        for info in pkgutil.walk_packages(getattr(package, "__path__", []), prefix=f"{name}."):
            if info.name.endswith("__main__"):
                continue  # running it is the child's job
            try:
                importlib.import_module(info.name)
            except Exception:  # noqa: BLE001
                pass
    for name in EXTRA_MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001
            pass


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def serve() -> None:
    """Answer requests until stdin closes; returns only in a forked child, set up to run its command."""
    requests, replies = os.fdopen(os.dup(0), "r"), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # a stray print of an import must not reach the reply channel
    _warm()
    # Move everything imported out of the collector's reach: a child's garbage collections would otherwise
    # walk (and so copy, page by page) the whole inherited heap, about 1 s of CPU a run. Import-time objects
    # live as long as the interpreter anyway; what a run creates is collected as usual.
    gc.freeze()
    threads = _threads()
    os.write(replies, (json.dumps({"ready": threads == 1, "threads": threads}) + "\n").encode())
    if threads != 1:
        os._exit(0)  # forking a process with threads is not safe: the client runs real subprocesses
    for line in requests:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            requests.close()
            os.close(replies)
            _become(request, devnull)
            return
        os.write(replies, (json.dumps({"pid": pid}) + "\n").encode())
        _, status, usage = os.wait4(pid, 0)
        os.write(replies, (json.dumps({"returncode": os.waitstatus_to_exitcode(status),
                                       "cpu_seconds": usage.ru_utime + usage.ru_stime}) + "\n").encode())
    os._exit(0)


def _become(request: dict, devnull: int) -> None:
    """In the child: the streams, environment, directory and arguments of ``python -m reconstruct ARGS``."""
    import random

    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.path[0] = os.getcwd()
    sys.argv = ["-m", *request["args"]]
    if not request["figures"]:  # the test checks no figure: draw none (tests/support/figures.py)
        _figures_module().draw_only_when(lambda: False)
    random.seed()  # a fresh interpreter's generators are seeded from the OS, not copied from a parent
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()


def _figures_module():
    """``tests/support/figures.py``, loaded from beside this file (``sys.path`` stays as ``python -m`` sets it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("test_support_figures", Path(__file__).with_name("figures.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    serve()
    import runpy

    runpy._run_module_as_main("reconstruct")  # noqa: SLF001 (what ``python -m reconstruct`` calls)
