"""Whether an output folder can be made and written, checked before any work (``--out``).

A path under a file (``notes.txt/out``) or on a read-only disk is bad input: one line naming the
flag, the path and what is wrong, instead of an OS error after the model has been loaded.
Nothing is created here: a refused job leaves no folder behind. (An ``--out`` that holds something other
than the job is refused by the job folder, ``job_folder.JobFolder.refuse_foreign``, once the command knows
which kind of job it is.)
"""

from __future__ import annotations

import os
from pathlib import Path


def check_out_folder(out: Path, flag: str = "--out") -> None:
    """Refuse an output folder that cannot be created or written.

    Args:
        out: the folder (it may not exist yet; its missing parents are created later).
        flag: the option that named it, for the message.

    Raises:
        ValueError: ``out`` or one of its parents is a file, or the first existing folder on its
            path is read-only (a read-only file system, or no write permission).
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out}: a file, not a folder (choose another {flag})")
    existing = out
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ValueError(f"{flag} {out}: {existing} is a file, not a folder (choose another {flag})")
    if existing.is_dir() and is_read_only(existing):
        where = "" if existing == out else f"{existing} is "
        raise ValueError(f"{flag} {out}: {where}read-only (choose a folder you can write to)")


def is_read_only(folder: Path) -> bool:
    """True when nothing can be written in ``folder``: a read-only file system or no write permission."""
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return True
    except OSError:  # pragma: no cover - statvfs is missing only on exotic file systems
        pass
    return not os.access(folder, os.W_OK | os.X_OK)
