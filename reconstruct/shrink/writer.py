"""Write a shrunk model folder atomically and resumably.

Layout: one safetensors shard per block plus one for the tensors outside the blocks (the engine's
``shard_name``), ``config.json`` with the kept sizes, the tokenizer and generation files, ``shrink.json``
(what was deleted, parameter counts before and after) and, last, the index: the file that makes the
folder loadable, so a folder without it is visibly unfinished. Every file is written to a temp file,
fsynced and renamed (``reconstruct.atomic``). ``.shrink-state.json`` records the source's identity,
the plan and the sha256 of each finished shard: a rerun after a kill re-verifies them and writes only
what is missing; a rerun after the end does nothing; an ``--out`` holding anything else is refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from reconstruct.atomic import (
    atomic_write_json, remove_stale_temp_files, save_safetensors_atomic, sha256_file,
)
from reconstruct.state.fingerprint import fingerprint_model_files
from reconstruct.state.lock import LOCK_NAME
from reconstruct.modelio.output import INDEX_NAME, WEIGHT_SUFFIXES, copy_side_files, shard_name, write_index
from reconstruct.modelio.folder_layout import SHRINK_STATE_NAME as STATE_NAME, SHRINK_SUMMARY_NAME as SUMMARY_NAME

logger = logging.getLogger(__name__)



def source_identity(folder: Path) -> dict[str, str]:
    """Cheap identity of the source's weights and config (``reconstruct.state.fingerprint``), reports left out."""
    files = fingerprint_model_files(folder)
    return {name: ident for name, ident in files.items()
            if name.endswith(WEIGHT_SUFFIXES) or name in ("config.json", INDEX_NAME)}


class ShrinkState:
    """``--out``'s record of one shrink: source identity, plan, finished shards, finished flag."""

    def __init__(self, out: Path, data: dict):
        self.out = out
        self.data = data

    @classmethod
    def open(cls, out: Path, source: dict, plan: dict) -> "ShrinkState":
        """Load the state of ``out`` or start one; refuse an ``--out`` that holds anything else.

        Raises:
            ValueError: ``--out`` holds other files, or the shrink of another folder or plan.
        """
        path = out / STATE_NAME
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("source") != source or data.get("plan") != plan:
                raise ValueError(f"--out {out} holds the shrink of another model or plan; choose another --out "
                                 "or delete it (nothing there was changed)")
            return cls(out, data)
        foreign = [p.name for p in out.iterdir() if not p.name.startswith(LOCK_NAME)] if out.is_dir() else []
        if foreign:
            raise ValueError(f"--out {out} is not empty and holds no shrunk model; choose an empty or new folder "
                             "(nothing there was changed)")
        state = cls(out, {"source": source, "plan": plan, "files": {}, "finished": False})
        state.save()
        return state

    @property
    def finished(self) -> bool:
        """True when every file was written and the files are unchanged."""
        return bool(self.data["finished"]) and all(self.done(name) for name in self.data["files"])

    def done(self, name: str) -> bool:
        """True when ``name`` was written before and still has the recorded content."""
        path = self.out / name
        return name in self.data["files"] and path.is_file() and sha256_file(path) == self.data["files"][name]

    def record(self, name: str, digest: str) -> None:
        """Note a finished file (its sha256)."""
        self.data["files"][name] = digest
        self.save()

    def finish(self) -> None:
        """Mark the whole folder written."""
        self.data["finished"] = True
        self.save()

    def save(self) -> None:
        """Write the state atomically."""
        atomic_write_json(self.out / STATE_NAME, self.data)


def write_shard(state: ShrinkState, name: str, make_tensors) -> None:
    """Write shard ``name`` from ``make_tensors()`` unless an earlier run finished it."""
    if state.done(name):
        logger.info("%s: already written", name)
        return
    state.record(name, save_safetensors_atomic(state.out / name, make_tensors(), {"format": "pt"}))


def write_small_file(state: ShrinkState, name: str, obj: dict) -> None:
    """Write a JSON file atomically and record it."""
    atomic_write_json(state.out / name, obj)
    state.record(name, sha256_file(state.out / name))


def finish_folder(state: ShrinkState, weight_map: dict[str, str], total_bytes: int) -> None:
    """Write the index (the folder becomes loadable) and mark the state finished."""
    write_index(state.out, weight_map, total_bytes)
    state.record(INDEX_NAME, sha256_file(state.out / INDEX_NAME))
    state.finish()


def clean_leftovers(out: Path) -> None:
    """Remove temp files a killed run left in ``out``."""
    remove_stale_temp_files(out)
    for path in out.glob(".*.copy-tmp"):
        path.unlink(missing_ok=True)


__all__ = ["ShrinkState", "STATE_NAME", "SUMMARY_NAME", "source_identity", "write_shard", "write_small_file",
           "copy_side_files", "finish_folder", "clean_leftovers", "shard_name"]
