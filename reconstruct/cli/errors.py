"""User errors as one line on stderr and exit code 2; the exit codes of the command line."""

from __future__ import annotations

import errno
from pathlib import Path

import typer

from reconstruct.config import MODEL
from reconstruct.modelio.safetensors_header import DamagedFileError
from reconstruct.parallel import distributed
from reconstruct.reporting.status import interrupted_summary

EXIT_BAD_INPUT = 2
EXIT_PLAN_DOES_NOT_FIT = 3  # `reconstruct plan`: the plan exceeds the memory budget
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT

OS_ERROR_ADVICE = {  # errno -> what to do, for OS errors that are the user's to fix
    errno.ENOSPC: "free space or choose another --out",
    errno.EDQUOT: "free space or choose another --out",
    errno.EROFS: "a read-only disk: choose another --out",
    errno.EACCES: "no permission: choose a path you can write to, or fix its permissions",
    errno.ENOTDIR: "a file stands where a folder is needed: choose another path",
}


def fail(message: str) -> None:
    """Print ``error: message`` on stderr and exit with code 2."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def guarded(action, files_flag: str = MODEL.name, out: Path | None = None):
    """Run ``action``; user errors become one line on stderr and exit code 2.

    User errors: ``ValueError`` (the specs' refusals name their flag: ``reconstruct.flags.FlagError``);
    a damaged model file (``DamagedFileError``, prefixed with ``files_flag``, or ``--out`` when the file
    lies in ``out``); a full, read-only or unwritable disk.
    """
    try:
        return action()
    except DamagedFileError as error:
        inside_out = out is not None and Path(out).resolve() in (error.path.resolve(), *error.path.resolve().parents)
        fail(f"{'--out' if inside_out else files_flag} {error}")
    except ValueError as error:
        fail(str(error))
    except OSError as error:
        if error.errno in OS_ERROR_ADVICE:
            fail(f"{error.strerror}: {error.filename or ''} ({OS_ERROR_ADVICE[error.errno]})")
        raise


def stop_interrupted(out: Path) -> None:
    """After Ctrl-C: one line on where the job stopped and how to resume it, then exit 130."""
    if distributed.is_main():
        typer.echo(f"\n{interrupted_summary(out)}", err=True)
    raise typer.Exit(EXIT_INTERRUPTED)
