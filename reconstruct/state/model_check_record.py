"""The model-level check's files in a run's state folder, and the revert it makes safe.

During the block loop each block's tensors that its repair changed are saved as they were before
the repair (``unrepaired/block-NNNNN.safetensors``, pruned weights, norms, zero biases for a bias
the repair added). After the loop the judge (``jobs/model_check_stage.py``) records its losses and
decision in ``model-check.json``; a revert stages the unrepaired block shards in ``reverted/``,
records their digests, then ``complete_pending_revert`` moves them over the output shards and
records them in the manifest. It is idempotent and also runs when a job is opened, so a kill in the
middle of the swap is finished before the manifest's block files are checked (as the retraining
stage's ``complete_pending_swap``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from reconstruct.atomic import atomic_write_json, save_safetensors_atomic
from reconstruct.faults import crash_point
from reconstruct.modelio.folder_layout import MODEL_CHECK_NAME, REVERT_STAGING_DIR, STATE_DIR, UNREPAIRED_DIR
from reconstruct.state.fingerprint import file_stat
from reconstruct.state.manifest import Manifest


def record_path(out: Path) -> Path:
    """Where the check's record lives in a run's output folder."""
    return Path(out) / STATE_DIR / MODEL_CHECK_NAME


def read_record(out: Path) -> dict:
    """The check's record (``{}`` before the judge has decided)."""
    path = record_path(out)
    return json.loads(path.read_text()) if path.is_file() else {}


def write_record(out: Path, record: dict) -> None:
    """Save the check's record atomically."""
    atomic_write_json(record_path(out), record)


def unrepaired_path(out: Path, index: int) -> Path:
    """The file of block ``index``'s tensors before its repair."""
    return Path(out) / STATE_DIR / UNREPAIRED_DIR / f"block-{index:05d}.safetensors"


def staging_dir(out: Path) -> Path:
    """Where a revert writes the unrepaired block shards before moving them over the output's."""
    return Path(out) / STATE_DIR / REVERT_STAGING_DIR


def save_unrepaired(out: Path, index: int, tensors: dict[str, torch.Tensor]) -> None:
    """Save block ``index``'s tensors before its repair (output names and dtypes), atomically; may be empty."""
    path = unrepaired_path(out, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(path, tensors)


def load_unrepaired(out: Path, index: int) -> dict[str, torch.Tensor]:
    """Block ``index``'s saved tensors before its repair (``{}`` when the repair changed none).

    Raises:
        ValueError: the file is missing (the state folder was emptied while the job was unfinished).
    """
    path = unrepaired_path(out, index)
    if not path.is_file():
        raise ValueError(f"{path} is missing: the model-level check cannot rebuild the unrepaired model; "
                         "run again with --force, or with --model-check off")
    return load_file(path)


def remove_check_files(out: Path) -> None:
    """Drop the unrepaired tensors and the staging folder once the decision is carried out (the record stays)."""
    shutil.rmtree(Path(out) / STATE_DIR / UNREPAIRED_DIR, ignore_errors=True)
    shutil.rmtree(staging_dir(out), ignore_errors=True)


def complete_pending_revert(out: Path) -> bool:
    """Move staged unrepaired shards over the output's and record them in the run's manifest.

    Idempotent: a shard already moved is only recorded. Returns whether a revert was pending.
    """
    out = Path(out)
    record = read_record(out)
    staged = record.get("staged")
    if staged is None or record.get("swapped"):
        return False
    manifest = Manifest.load(out)
    by_file = {block.file: block for block in manifest.blocks}
    for name, digest in sorted(staged.items()):
        if (staging_dir(out) / name).is_file():
            os.replace(staging_dir(out) / name, out / name)
            crash_point(f"model-check-swap:{name}")
        by_file[name].sha256, by_file[name].stat = digest, file_stat(out / name)
    manifest.save(out)
    write_record(out, {**record, "swapped": True})
    return True
