"""The record of ``run --retrain-steps`` in its output folder, and the swap it makes safe.

``--out/.reconstruct/retrain-stage.json`` says how far the retraining stage got (staged, swapped,
finished); ``complete_pending_swap`` finishes a swap a kill interrupted. Both are job-folder state:
read by the stage itself, by the run when it opens a folder, and by ``reconstruct status``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from reconstruct.atomic import atomic_write_json
from reconstruct.faults import crash_point
from reconstruct.modelio.folder_layout import RETRAIN_STAGE_NAME as STAGE_NAME
from reconstruct.modelio.folder_layout import RETRAIN_STAGING_DIR as STAGING_DIR
from reconstruct.modelio.folder_layout import STATE_DIR
from reconstruct.state.fingerprint import file_stat
from reconstruct.state.manifest import Manifest


def record_path(out: Path) -> Path:
    """Where the stage's record lives in a run's output folder."""
    return Path(out) / STATE_DIR / STAGE_NAME


def read_stage(out: Path) -> dict:
    """The stage's record (``{}`` before it starts)."""
    path = record_path(out)
    return json.loads(path.read_text()) if path.is_file() else {}


def complete_pending_swap(out: Path) -> bool:
    """Move staged block shards over the layer-wise ones and record them in the run's manifest.

    Idempotent: a shard already moved is only recorded. Returns whether a swap was pending.
    """
    out = Path(out)
    stage = read_stage(out)
    staged = stage.get("staged")
    if not staged or stage.get("swapped"):
        return False
    manifest = Manifest.load(out)
    staging = out / STATE_DIR / STAGING_DIR
    by_file = {record.file: record for record in manifest.blocks}
    for name, digest in sorted(staged["shards"].items()):
        if (staging / name).is_file():
            os.replace(staging / name, out / name)
            crash_point(f"retrain-swap:{name}")
        record = by_file[name]
        record.sha256, record.stat = digest, file_stat(out / name)
        added = staged["added_biases"].get(name, [])
        record.stats["added_biases"] = sorted(set(record.stats.get("added_biases", [])) | set(added))
    manifest.save(out)
    atomic_write_json(record_path(out), {**stage, "swapped": True})
    return True
