"""Model-level LoRAPrune's per-block records on disk: host memory stays at one block's record.

For unstructured and N:M patterns the controller (``pruners.loraprune_model``) keeps a float32
moving average and a keep mask per prunable weight: 5 bytes a weight, O(model). This store keeps
each block's record as its own safetensors file in ``--out/.reconstruct/loraprune/``, written
atomically after every update, and read when the block's gradients of the next step are ready.

Checkpoints cost no copy: ``checkpoint(step)`` hard-links the current files into
``snapshot-<step>/`` (an atomic write replaces a file by rename, so a link keeps the old bytes), and
``restore(step)`` links them back. The two newest snapshots are kept, so a crash between a snapshot
and the trainer's own checkpoint file still finds the snapshot the older checkpoint names.

Under torchrun every rank keeps the same records (the gradients are all-reduced), rank 0 in
``--out`` and the others in private scratch folders that end with their session; a resumed rank
other than 0 copies its records from rank 0's snapshot (``published``), so the stage continues
from its last checkpoint on every rank.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor

from reconstruct.atomic import fsync_dir, remove_stale_temp_files, save_safetensors_atomic

logger = logging.getLogger(__name__)

SNAPSHOT_PREFIX = "snapshot-"
KEPT_SNAPSHOTS = 2


class DiskImportanceStore:
    """Block records as ``block-<index>.safetensors`` files in ``folder`` (an ``ImportanceStore``).

    Args:
        folder: the store's folder (created); only this store writes there.
        published: the folder whose snapshots ``restore`` reads: rank 0's store, which outlives the
            session (default: ``folder``). Files are linked from ``folder`` itself, copied from elsewhere.
    """

    def __init__(self, folder: Path, published: Path | None = None) -> None:
        self.folder = Path(folder)
        self.published = Path(published) if published is not None else self.folder
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(self.folder)

    def _path(self, index: int, folder: Path | None = None) -> Path:
        return (folder or self.folder) / f"block-{index:05d}.safetensors"

    def _block_files(self, folder: Path) -> list[Path]:
        return sorted(folder.glob("block-*.safetensors"))

    def _snapshot(self, step: int, folder: Path | None = None) -> Path:
        return (folder or self.folder) / f"{SNAPSHOT_PREFIX}{step:08d}"

    def _snapshots(self) -> list[tuple[int, Path]]:
        found = [(int(path.name[len(SNAPSHOT_PREFIX):]), path) for path in self.folder.glob(f"{SNAPSHOT_PREFIX}*")
                 if path.name[len(SNAPSHOT_PREFIX):].isdigit()]
        return sorted(found)

    def load(self, index: int) -> dict[str, Tensor]:
        """Block ``index``'s record (empty before the first save)."""
        path = self._path(index)
        return load_file(path) if path.exists() else {}

    def save(self, index: int, record: dict[str, Tensor]) -> None:
        """Replace block ``index``'s record, atomically."""
        save_safetensors_atomic(self._path(index), {key: value.contiguous() for key, value in record.items()})

    def checkpoint(self, step: int) -> dict[str, Tensor]:
        """Hard-link every record into ``snapshot-<step>/``; nothing for the caller's file.

        A store that resumes from another's snapshots (``published``) makes none of its own.
        """
        if self.published != self.folder:
            return {}
        target = self._snapshot(step)
        building = target.with_name(f".{target.name}.building")
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir()
        for path in self._block_files(self.folder):
            os.link(path, building / path.name)
        fsync_dir(building)
        shutil.rmtree(target, ignore_errors=True)  # a resumed run checkpointing the same step again
        os.rename(building, target)
        fsync_dir(self.folder)
        for _, older in self._snapshots()[:-KEPT_SNAPSHOTS]:
            shutil.rmtree(older)
        return {}

    def restore(self, step: int, saved: dict[str, Tensor]) -> None:
        """Make the records those of ``snapshot-<step>/`` in ``published`` (none at step 0 without one); drop newer snapshots.

        Raises:
            RuntimeError: no snapshot of ``step`` (the folder was changed by hand).
        """
        source = self._snapshot(step, self.published)
        if not source.is_dir() and step != 0:
            raise RuntimeError(f"loraprune: no importance snapshot of step {step} in {self.published}")
        for path in self._block_files(self.folder):
            path.unlink()
        if source.is_dir():
            place = os.link if self.published == self.folder else shutil.copyfile
            for path in self._block_files(source):
                place(path, self.folder / path.name)
        fsync_dir(self.folder)
        for later, path in self._snapshots():
            if later > step:
                shutil.rmtree(path)
        logger.info("loraprune: importance records restored to step %d", step)
