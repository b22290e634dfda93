"""One writer per output folder: ``out_dir/.reconstruct.lock``.

How the lock works
------------------
Where the OS offers ``flock`` (Linux, macOS, and NFS/Lustre mounts that support it), the kernel lock
on the open lock file is the authority: it is exclusive per open file (so a second :class:`JobLock`
in the same process is refused, too), and the kernel drops it the instant its holder dies, even by
``kill -9``. There is therefore no stale-lock race to win: whoever gets the ``flock`` owns the
folder. The JSON inside (``{"pid", "host", "started"}``) serves the refusal message and the warning
when a dead run's lock is taken over. This also gets pid reuse right (a container restarted with the
dead run's pid is not mistaken for a live owner), which a pid check alone cannot.

Where ``flock`` is missing or unsupported by the file system, the lock is the file's existence, as
with ``O_CREAT|O_EXCL``, but created with ``os.link`` from a staging file so it never exists
half-written. A stale lock (dead pid on this host, or garbage) must be removed before it can be
retaken, and a plain "read, judge stale, unlink" races: a slow taker could unlink the lock that a
faster taker has just installed, and both would then hold the folder. So removal goes through a
*claim*: a file named after the stale lock's exact identity (hash of its bytes and inode), created
with ``O_EXCL``. Only the one process that wins the claim may unlink, and only after checking the
path still holds that same stale lock; nobody else can remove it meanwhile, since that too would
take the claim. Winner and losers then compete again with ``os.link``: one wins, the others see a
live lock and are refused. Within one process, fallback acquisitions are serialised by a thread
lock, since they all share one pid.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path

from reconstruct.atomic import DiskWriteError
from reconstruct.modelio.folder_layout import LOCK_NAME

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)


# Lock files held by this process in fallback (no-flock) mode: a lock naming our own pid that is
# not in here was left by a dead process whose pid we now reuse.
_held_here: set[str] = set()
_held_guard = threading.Lock()
CLAIM_TIMEOUT_S = 10.0  # how long to wait for another taker that is removing the same stale lock

_FLOCK_UNSUPPORTED = {errno.ENOLCK, errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    if pid <= 0:
        return False
    if os.name == "nt":  # pragma: no cover - os.kill(pid, 0) would send CTRL_C there
        import psutil

        return psutil.pid_exists(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _parse(raw: bytes) -> dict | None:
    """The lock's owner record, or ``None`` if the bytes are not a valid record."""
    try:
        info = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int) or isinstance(info["pid"], bool):
        return None
    return info


def _describe(info: dict | None) -> str:
    if info is None:
        return "pid unknown"
    host = info.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return f"pid {info['pid']}{where}"


class JobLock:
    """Context manager that makes the holder the only ``reconstruct`` process writing ``out_dir``.

    Example:
        >>> with JobLock(out_dir):
        ...     run_job()

    Raises:
        ValueError: from ``__enter__``, when another live reconstruct process holds the folder.
        DiskWriteError: from ``__enter__``, when the lock file cannot be created (read-only
            folder, no space ...).
    """

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self._fd: int | None = None  # flock mode: the open, locked lock file
        self._record: bytes | None = None  # fallback mode: the exact bytes we wrote
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of our lock file
        self._key: str | None = None  # fallback mode: our entry in _held_here

    # ------------------------------------------------------------------ public protocol
    def __enter__(self) -> JobLock:
        if self._identity is not None:
            raise RuntimeError(f"JobLock({self.out_dir}) is already held by this object")
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if fcntl is None or not self._acquire_flock():
                self._acquire_fallback()
        except OSError as exc:
            raise DiskWriteError.from_oserror(self.path, exc) from exc
        logger.debug("locked %s", self.out_dir)
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def release(self) -> None:
        """Remove the lock file if it is still ours, and drop the lock. Safe to call twice."""
        if self._identity is None:
            return
        try:
            if self._still_ours():
                os.unlink(self.path)
        except OSError as exc:
            logger.warning("could not remove lock file %s: %s", self.path, exc)
        finally:
            if self._fd is not None:
                os.close(self._fd)  # drops the flock
            elif self._key is not None:
                with _held_guard:
                    _held_here.discard(self._key)
            self._fd = None
            self._key = None
            self._record = None
            self._identity = None

    # ------------------------------------------------------------------ helpers
    def _new_record(self) -> bytes:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        return (json.dumps(info, sort_keys=True) + "\n").encode("utf-8")

    def _refuse(self, info: dict | None) -> ValueError:
        return ValueError(
            f"{self.out_dir} is being written by another reconstruct process ({_describe(info)}); "
            f"wait for it or choose another --out"
        )

    def _warn_takeover(self, raw: bytes, info: dict | None, why: str) -> None:
        if info is None:
            logger.warning("lock file %s was unreadable (%d bytes); taking it over", self.path, len(raw))
        else:
            logger.warning(
                "taking over the lock of an earlier reconstruct run (%s, started %s): %s",
                _describe(info), info.get("started", "?"), why,
            )

    def _still_ours(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        if (st.st_dev, st.st_ino) != self._identity:
            return False
        if self._record is not None:  # fallback mode: also compare the bytes
            try:
                return self.path.read_bytes() == self._record
            except OSError:
                return False
        return True

    # ------------------------------------------------------------------ flock mode
    def _acquire_flock(self) -> bool:
        """Take the lock with ``flock``. Returns False if the file system does not support it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raw = _read_fd(fd)
                os.close(fd)
                raise self._refuse(_parse(raw)) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in _FLOCK_UNSUPPORTED:
                    logger.debug("flock unsupported on %s (%s); using the pid lock", self.out_dir, exc)
                    return False
                raise
            # The previous holder may have unlinked the file between our open and our flock: then we
            # hold a lock on an orphan inode while the path is (or will be) someone else's. Retry.
            mine = os.fstat(fd)
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            if current is None or (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino):
                os.close(fd)
                continue
            break
        raw = _read_fd(fd)
        if raw.strip():
            info = _parse(raw)
            if info is None:
                why = "unreadable"
            elif info.get("host") not in (None, socket.gethostname()):
                why = "its host no longer holds the file lock"
            elif info["pid"] != os.getpid() and pid_alive(info["pid"]):
                why = f"pid {info['pid']} is alive but does not hold the lock (pid reused)"
            else:
                why = "the process is gone"
            self._warn_takeover(raw, info, why)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, self._new_record(), 0)
            os.fsync(fd)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        self._identity = (mine.st_dev, mine.st_ino)
        return True

    # ------------------------------------------------------------------ fallback mode
    def _acquire_fallback(self) -> None:
        record = self._new_record()
        key = str(self.path.resolve())
        staging = self.out_dir / f"{LOCK_NAME}.{os.getpid()}.{secrets.token_hex(4)}.new"
        deadline = time.monotonic() + CLAIM_TIMEOUT_S
        with _held_guard:  # threads of one process share a pid: let them take turns
            staging.write_bytes(record)
            try:
                while True:
                    try:
                        os.link(staging, self.path)  # atomic create-if-absent, content complete
                    except FileExistsError:
                        self._remove_if_stale(key, deadline)
                        continue
                    break
                st = os.stat(self.path)
            finally:
                staging.unlink(missing_ok=True)
            _held_here.add(key)
        self._key = key
        self._record = record
        self._identity = (st.st_dev, st.st_ino)
        self._sweep_leftovers()

    def _remove_if_stale(self, key: str, deadline: float) -> None:
        """Raise if the existing lock is live; otherwise remove it, if we win its claim."""
        try:
            raw = self.path.read_bytes()
            judged = os.stat(self.path)
        except FileNotFoundError:
            return  # released meanwhile: compete again
        info = _parse(raw)
        if info is not None:
            if info.get("host") not in (None, socket.gethostname()):
                raise ValueError(
                    f"{self.out_dir} is locked by a reconstruct process on host {info['host']} "
                    f"(pid {info['pid']}); if no job runs there, delete {self.path}, or choose another --out"
                )
            if info["pid"] == os.getpid():
                if key in _held_here:  # a live JobLock of this very process
                    raise self._refuse(info)
            elif pid_alive(info["pid"]):
                raise self._refuse(info)
        identity = hashlib.sha256(raw + f"|{judged.st_dev}|{judged.st_ino}".encode()).hexdigest()[:16]
        claim = self.out_dir / f"{LOCK_NAME}.break-{identity}"
        try:
            os.close(os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            if time.monotonic() > deadline:
                raise ValueError(
                    f"{self.out_dir}: another process seems stuck taking over the stale lock {self.path}; "
                    f"if no reconstruct runs, delete {self.path} and {claim}"
                ) from None
            time.sleep(0.01)  # another taker is removing this stale lock right now
            return
        # We own the right to remove exactly this stale lock; nobody else can remove it meanwhile.
        # Compare bytes as well as the inode: a freed inode number is soon reused for a new lock.
        try:
            current = os.stat(self.path)
            unchanged = (current.st_dev, current.st_ino) == (judged.st_dev, judged.st_ino)
            unchanged = unchanged and self.path.read_bytes() == raw
        except FileNotFoundError:
            unchanged = False
        if unchanged:
            self._warn_takeover(raw, info, "the process is gone")
            os.unlink(self.path)
        claim.unlink(missing_ok=True)  # safe: the lock it names is gone for good

    def _sweep_leftovers(self) -> None:
        """Remove claim files and staging files of dead processes (we hold the lock now)."""
        for leftover in self.out_dir.glob(f"{LOCK_NAME}.*"):
            name = leftover.name[len(LOCK_NAME) + 1:]
            if name.startswith("break-"):
                dead = True  # its stale lock is gone, so the claim is moot
            else:
                pid = name.split(".", 1)[0]
                dead = name.endswith(".new") and pid.isdigit() and not pid_alive(int(pid))
            if dead:
                leftover.unlink(missing_ok=True)


def _read_fd(fd: int, limit: int = 1 << 16) -> bytes:
    """Read up to ``limit`` bytes from the start of an open file."""
    try:
        return os.pread(fd, limit, 0)
    except OSError:
        return b""
