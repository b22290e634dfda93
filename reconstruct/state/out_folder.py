"""Whether an output folder can be made and written, checked before any work (``--out``).

A path under a file (``notes.txt/out``) or on a read-only disk is bad input: one line naming the
flag, the path and what is wrong, instead of an OS error after the model has been loaded.
Nothing is created here: a refused job leaves no folder behind.
"""

from __future__ import annotations

import os
from pathlib import Path

from reconstruct.atomic import TEMP_SUFFIX
from reconstruct.modelio.folder_layout import LOCK_NAME, MANIFEST_NAME, STATE_DIR


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


def check_out_dir(out: Path) -> None:
    """Refuse an ``--out`` that exists and holds something other than a reconstruct job."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    foreign = [path for path in out.iterdir() if not is_own_leftover(path.name)] if out.is_dir() else []
    if foreign and not (out / MANIFEST_NAME).is_file():
        raise ValueError(
            f"--out {out} is not empty and holds no reconstruct job; choose an empty or new folder "
            "(nothing there was changed)"
        )


def is_own_leftover(name: str) -> bool:
    """Files a killed run may leave before its first manifest: lock, state folder, temp files."""
    return name == LOCK_NAME or name.startswith(LOCK_NAME + ".") or name == STATE_DIR or name.endswith(TEMP_SUFFIX)
