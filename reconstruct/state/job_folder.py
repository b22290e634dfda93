"""A job's output folder, handled one way by every command that writes one (run, retrain, shrink).

What every job folder does alike lives here, once:

- the refusal of a foreign ``--out``: a folder that holds something other than this kind of job, or
  a file (nothing there is changed);
- the lock (``lock.JobLock``), then the removal of temp files that a killed write left in the folder
  and in its state folder (``atomic.remove_stale_temp_files``);
- the part of the fingerprint every job shares (``setup_fingerprint``: the model's files by whole-file
  sha256 through the folder's hash cache, dtype, device type, processes, installed versions) and the
  "same job?" check, which names the flags that changed (``job_diff``);
- the record of a job kept in one small JSON file (``JobRecord``: fingerprint, finished files and their
  sha256, the finished flag), and the check that recorded files are still intact.

A ``FolderKind`` says which record marks a folder as a kind's own and how its refusals read. ``run``
keeps its richer record, the manifest (``manifest.Manifest``), in a folder opened the same way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

import reconstruct
from reconstruct.atomic import TEMP_SUFFIX, atomic_write_json, remove_stale_temp_files, sha256_file
from reconstruct.modelio.folder_layout import (
    HASH_CACHE_NAME, LOCK_NAME, MANIFEST_NAME, RETRAIN_MANIFEST_NAME, SHRINK_STATE_NAME, STATE_DIR,
)
from reconstruct.modelio.loaded import LoadedModel
from reconstruct.parallel import distributed
from reconstruct.runtime import dtype_name
from reconstruct.state.fingerprint import HashCache, fingerprint_model_files
from reconstruct.state.job_diff import WORLD_SIZE_KEY, check_same_world_size, diff_fingerprints, flag_of_field
from reconstruct.state.lock import JobLock


@dataclass(frozen=True)
class FolderKind:
    """What one kind of job keeps in its folder and how its refusals read."""

    record: str  # the record that marks a folder as this kind's job, relative to the folder
    noun: str  # "--out ... holds no <noun>"
    different: str  # "--out ... holds <different> (the changes)"
    way_out: str  # what to do about a different job (or a damaged record)
    start_over: str  # the other way out of another process count
    flat_record: bool = False  # JobRecord.flat: the record's layout
    keeps_files: bool = False  # the record lists each finished file's sha256


RUN_JOB = FolderKind(
    MANIFEST_NAME, "reconstruct job", "a different job",
    "rerun with the original arguments to resume, choose another --out, or pass --force to start over",
    "pass --force to start over",
)
RETRAIN_JOB = FolderKind(
    f"{STATE_DIR}/{RETRAIN_MANIFEST_NAME}", "retraining job", "a different retraining job",
    "use another --out or the same flags", "use another --out",
)
SHRINK_JOB = FolderKind(
    SHRINK_STATE_NAME, "shrunk model", "the shrink of another model or plan",
    "choose another --out or delete it (nothing there was changed)", "choose another --out",
    flat_record=True, keeps_files=True,
)


def is_own_leftover(name: str) -> bool:
    """Files a killed job may leave before its record: the lock, the state folder, temp files."""
    return name == LOCK_NAME or name.startswith(LOCK_NAME + ".") or name == STATE_DIR or name.endswith(TEMP_SUFFIX)


def setup_fingerprint(loaded: LoadedModel, hashes: HashCache | None, one_process_recorded: bool) -> dict:
    """The fingerprint entries every job shares: what it read and how it computes.

    Args:
        loaded: the input model (its files, whole-file sha256; dtype; device).
        hashes: the folder's hash cache (``JobFolder.hash_cache``); None reads every model file.
        one_process_recorded: record ``world_size`` for one process too (``retrain``'s fingerprints
            always held it); ``run``'s hold it above 1 only, so those made before ``--nproc`` stay
            valid. Either way ``check_same_job`` reads an absent count as 1.
    """
    size = distributed.world().size
    return {
        "model_files": fingerprint_model_files(loaded.folder, hashes),
        "dtype": dtype_name(loaded.dtype),
        "device_type": loaded.device.type,
        # processes sharing the samples: another count changes the float summation order (docs/distributed.md)
        **({WORLD_SIZE_KEY: size} if size > 1 or one_process_recorded else {}),
        "versions": {"reconstruct": reconstruct.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }


@dataclass
class JobRecord:
    """The record of a job kept in one small JSON file: what the job is, its finished files, whether it finished.

    ``reconstruct retrain`` keeps ``{"fingerprint", "finished"}``; ``reconstruct shrink`` keeps its
    fingerprint's keys (``source``, ``plan``) at the top level beside ``files`` and ``finished``
    (``flat``), as each has since its first version, so folders written before resume.
    """

    path: Path
    fingerprint: dict
    finished: bool = False
    files: dict[str, str] | None = None  # file name → sha256 of each finished file; None: not kept
    flat: bool = False  # the fingerprint's keys at the top level of the file

    def to_dict(self) -> dict:
        """The JSON form written by :meth:`save`."""
        data = dict(self.fingerprint) if self.flat else {"fingerprint": self.fingerprint}
        if self.files is not None:
            data["files"] = self.files
        return {**data, "finished": self.finished}

    @classmethod
    def load(cls, path: Path, flat: bool) -> JobRecord | None:
        """The record at ``path``; None when there is none.

        Raises:
            ValueError: the file is not a record (unreadable JSON, a missing key).
        """
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            fingerprint = {k: v for k, v in data.items() if k not in ("files", "finished")} if flat \
                else data["fingerprint"]
            files = data.get("files")
            return cls(path, fingerprint, bool(data.get("finished")), None if files is None else dict(files), flat)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{path} is damaged ({type(error).__name__}: {error})".splitlines()[0]) from None

    def save(self) -> None:
        """Write the record atomically."""
        atomic_write_json(self.path, self.to_dict())

    def record_file(self, name: str, digest: str) -> None:
        """Note a finished file by its sha256, and save."""
        self.files = {**(self.files or {}), name: digest}
        self.save()

    def finish(self) -> None:
        """Mark the job finished, and save."""
        self.finished = True
        self.save()


@dataclass
class JobFolder:
    """One job's output folder (``--out``): refusal, lock, clean-up, hash cache, same-job check, records."""

    out: Path
    kind: FolderKind

    def __post_init__(self) -> None:
        self.out = Path(self.out)

    @property
    def state_dir(self) -> Path:
        """The folder's resume state (calibration tokens, checkpoints, the hash cache)."""
        return self.out / STATE_DIR

    @property
    def record_path(self) -> Path:
        """The record that marks the folder as this kind's job."""
        return self.out / self.kind.record

    def refuse_foreign(self) -> None:
        """Refuse an ``--out`` that is a file, or holds something and no job of this kind; changes nothing.

        Raises:
            ValueError: one line naming ``--out`` and what to do.
        """
        out = self.out
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; give a folder")
        if not out.is_dir() or self.record_path.is_file():
            return
        if any(not is_own_leftover(path.name) for path in out.iterdir()):
            raise ValueError(f"--out {out} is not empty and holds no {self.kind.noun}; choose an empty or new "
                             "folder (nothing there was changed)")

    @contextmanager
    def locked(self):
        """Hold the folder's lock (created with the folder if need be); temp files of killed writes removed first."""
        with JobLock(self.out) as lock:
            for folder in (self.out, self.state_dir):
                remove_stale_temp_files(folder)
            yield lock

    def hash_cache(self) -> HashCache:
        """The model files' whole-file digests remembered in the state folder (``fingerprint.HashCache``)."""
        return HashCache(self.state_dir / HASH_CACHE_NAME)

    def check_same_job(self, recorded: dict, fingerprint: dict, flags: Mapping[str, str]) -> None:
        """Refuse to continue a different job in this folder, naming the flags that differ.

        Args:
            recorded: the fingerprint in the folder's record.
            fingerprint: the job's asked for now.
            flags: labels of the fingerprint's fields (``job_diff.flag_of_field``): the job's own map,
                as ``jobs.run_fingerprint.RUN_FINGERPRINT_FLAGS``.

        Raises:
            ValueError: another process count (``--nproc``, an absent count is 1), else one line
                listing every changed flag and the ways out.
        """
        check_same_world_size(recorded, fingerprint, self.out, self.kind.start_over)
        recorded, fingerprint = ({k: v for k, v in f.items() if k != WORLD_SIZE_KEY} for f in (recorded, fingerprint))
        changes = diff_fingerprints(recorded, fingerprint, label=lambda key: flag_of_field(key, flags))
        if changes:
            raise ValueError(f"--out {self.out} holds {self.kind.different} ({'; '.join(changes)}); "
                             f"{self.kind.way_out}")

    def file_intact(self, name: str, digest: str | None) -> bool:
        """True when ``name`` exists in the folder with the sha256 ``digest``."""
        path = self.out / name
        return digest is not None and path.is_file() and sha256_file(path) == digest

    def intact(self, files: dict[str, str]) -> bool:
        """True when every recorded file exists with its recorded sha256."""
        return all(self.file_intact(name, digest) for name, digest in files.items())

    def read_record(self) -> JobRecord | None:
        """This kind's record in the folder, or None when there is none.

        Raises:
            ValueError: the record is damaged; the message says what to do.
        """
        try:
            return JobRecord.load(self.record_path, self.kind.flat_record)
        except ValueError as error:
            raise ValueError(f"{error}; {self.kind.way_out}") from None

    def new_record(self, fingerprint: dict) -> JobRecord:
        """Start this kind's record, saved: the job's fingerprint, nothing finished."""
        self.record_path.parent.mkdir(parents=True, exist_ok=True)
        record = JobRecord(self.record_path, fingerprint, False, {} if self.kind.keeps_files else None,
                           self.kind.flat_record)
        record.save()
        return record
