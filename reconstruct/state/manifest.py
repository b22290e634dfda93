"""The resume record of a job: ``<out>/reconstruct-manifest.json``.

It stores what determines the result (the *fingerprint*), which blocks are finished (file name and
sha256 of each block's tensors) and where the activation checkpoint stands. A resumed run compares
fingerprints (:meth:`Manifest.check_same_job`: the job folder's check, naming flags), re-checks the
finished block files (:func:`verify_block_files`) and continues at :meth:`Manifest.first_unfinished_block`.
The file is rewritten atomically after every change, so a crash leaves the previous version.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from reconstruct.atomic import atomic_write_json, sha256_file
from reconstruct.faults import crash_point
from reconstruct.modelio.folder_layout import MANIFEST_NAME
from reconstruct.state.fingerprint import file_stat
from reconstruct.state.job_diff import (  # noqa: F401  (re-exported: the manifest is where callers look)
    diff_fingerprints, to_jsonable,
)
from reconstruct.state.job_folder import RUN_JOB, JobFolder

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
PENDING = "pending"
DONE = "done"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _check_relative(file: str) -> str:
    rel = PurePosixPath(str(file).replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ValueError(f"block file {file!r} must be a path relative to the output folder")
    return rel.as_posix()


@dataclass
class BlockRecord:
    """State of one transformer block."""

    index: int  # position in the model's block list
    status: str = PENDING  # "pending" | "done"
    file: str | None = None  # block tensors, relative to the output folder
    sha256: str | None = None  # of that file's bytes
    stats: dict = field(default_factory=dict)  # free-form report: mse, sparsity, seconds ...
    stat: dict | None = None  # the file's size, mtime_ns, ctime_ns, inode once written (fingerprint.file_stat)


@dataclass
class Manifest:
    """Everything a resumed run needs to continue where the last one stopped."""

    fingerprint: dict[str, object]  # everything that determines the output bytes
    n_blocks: int
    blocks: list[BlockRecord]
    stream_checkpoint: dict | None = None  # {"after_block": i, "file": name, "sha256": hex}
    finished: bool = False
    created: str = ""  # ISO-8601 UTC
    updated: str = ""  # ISO-8601 UTC, at the last save
    elapsed_seconds: float = 0.0  # working time summed over sessions; the engine adds to it
    outputs: dict[str, str] = field(default_factory=dict)  # finished job: non-block output file → sha256
    # --allocation owl / FILE.json: {"kind", "sparsities", "outlier_ratios" (owl), "param_counts"}, once known
    allocation: dict | None = None
    # --loraprune-objective model: {"files": {block: {"file", "sha256"}}, "history", "loss_curve", ...}, once done
    loraprune: dict | None = None

    # ------------------------------------------------------------------ construction / IO
    @classmethod
    def new(cls, fingerprint: dict[str, object], n_blocks: int) -> Manifest:
        """A fresh manifest with every block pending.

        Args:
            fingerprint: What determines the result; normalised to its JSON form, so it compares
                equal to the one read back from disk.
            n_blocks: Number of transformer blocks.
        """
        if n_blocks < 0:
            raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")
        now = _now()
        return cls(
            fingerprint=to_jsonable(fingerprint),
            n_blocks=n_blocks,
            blocks=[BlockRecord(index=i) for i in range(n_blocks)],
            created=now,
            updated=now,
        )

    @staticmethod
    def path(out_dir: Path) -> Path:
        """Where the manifest of ``out_dir`` lives."""
        return Path(out_dir) / MANIFEST_NAME

    @classmethod
    def load(cls, out_dir: Path) -> Manifest | None:
        """Read the manifest of ``out_dir``.

        Returns:
            The manifest, or ``None`` if there is none.

        Raises:
            ValueError: if the file is unreadable, not valid JSON or not a manifest; the message says
                so and that ``--force`` starts over.
        """
        path = cls.path(out_dir)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ValueError(f"cannot read the manifest {path} ({exc.strerror}); check the folder's "
                             f"permissions, or pass --force to start over") from exc
        try:
            return cls.from_dict(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            detail = f"{type(exc).__name__}: {exc}".splitlines()[0]
            raise ValueError(
                f"the manifest {path} is damaged ({detail}); pass --force to start over "
                f"(finished blocks will be recomputed)"
            ) from exc

    def save(self, out_dir: Path) -> None:
        """Write the manifest atomically and stamp ``updated``.

        ``elapsed_seconds`` is saved as it stands: the caller adds each session's working time.

        Raises:
            DiskWriteError: if the write fails (the previous manifest stays in place).
        """
        self.updated = _now()
        atomic_write_json(self.path(out_dir), self.to_dict())

    def to_dict(self) -> dict:
        """The JSON form written by :meth:`save`."""
        return {
            "version": MANIFEST_VERSION,
            "fingerprint": self.fingerprint,
            "n_blocks": self.n_blocks,
            "blocks": [dataclasses.asdict(b) for b in self.blocks],
            "stream_checkpoint": self.stream_checkpoint,
            "finished": self.finished,
            "created": self.created,
            "updated": self.updated,
            "elapsed_seconds": self.elapsed_seconds,
            "outputs": self.outputs,
            **({"allocation": self.allocation} if self.allocation is not None else {}),  # absent: uniform
            **({"loraprune": self.loraprune} if self.loraprune is not None else {}),  # absent: no model-level stage
        }

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        """Inverse of :meth:`to_dict`, validating the structure.

        Raises:
            ValueError: if ``data`` is not a manifest this version understands.
        """
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        version = data.get("version")
        if version != MANIFEST_VERSION:
            raise ValueError(f"manifest version {version!r}, this reconstruct reads {MANIFEST_VERSION}")
        n_blocks = data["n_blocks"]
        if not isinstance(data["fingerprint"], dict) or not isinstance(n_blocks, int):
            raise ValueError("bad fingerprint or n_blocks")
        blocks = [BlockRecord(**b) for b in data["blocks"]]
        if [b.index for b in blocks] != list(range(n_blocks)):
            raise ValueError(f"block list does not cover blocks 0..{n_blocks - 1}")
        for b in blocks:
            if b.status not in (PENDING, DONE) or (b.status == DONE and not (b.file and b.sha256)):
                raise ValueError(f"block {b.index} has an invalid record")
        checkpoint = data["stream_checkpoint"]
        if checkpoint is not None and not {"after_block", "file", "sha256"} <= set(checkpoint):
            raise ValueError("bad stream_checkpoint")
        manifest = cls(
            fingerprint=data["fingerprint"],
            n_blocks=n_blocks,
            blocks=blocks,
            stream_checkpoint=checkpoint,
            finished=bool(data["finished"]),
            created=str(data["created"]),
            updated=str(data["updated"]),
            elapsed_seconds=float(data["elapsed_seconds"]),
            outputs=dict(data.get("outputs") or {}),
            allocation=data.get("allocation"),
            loraprune=data.get("loraprune"),
        )
        return manifest

    # ------------------------------------------------------------------ state changes
    def _block(self, index: int) -> BlockRecord:
        if not 0 <= index < self.n_blocks:
            raise IndexError(f"block {index} out of range 0..{self.n_blocks - 1}")
        return self.blocks[index]

    def mark_block_done(self, index: int, file: str, sha256: str, stats: dict | None = None,
                        stat: dict | None = None) -> None:
        """Record block ``index`` as finished (call :meth:`save` afterwards).

        Args:
            index: Block index.
            file: The block's tensors file, relative to the output folder.
            sha256: Digest of that file, as returned by ``save_safetensors_atomic``.
            stats: Per-block report; numpy/torch scalars are converted to Python numbers.
            stat: The file's ``fingerprint.file_stat`` once written; while it holds, a resume trusts
                ``sha256`` without reading the file (None: the file is re-hashed on resume).
        """
        record = self._block(index)
        record.stats = to_jsonable(stats or {})
        record.file = _check_relative(file)
        record.sha256 = sha256
        record.stat = stat
        record.status = DONE

    def mark_block_pending(self, index: int) -> None:
        """Forget block ``index``'s result, so it is computed again."""
        record = self._block(index)
        record.status, record.file, record.sha256, record.stats, record.stat = PENDING, None, None, {}, None
        self.finished = False

    def set_allocation(self, allocation: dict) -> None:
        """Record the per-block sparsities (and OWL's outlier ratios) so a resume does not compute them again."""
        self.allocation = to_jsonable(allocation)

    def set_loraprune(self, stage: dict) -> None:
        """Record model-level LoRAPrune's mask files and schedule so a resume does not train again."""
        self.loraprune = to_jsonable(stage)

    def set_stream_checkpoint(self, after_block: int, file: str, sha256: str) -> None:
        """Record that the activation checkpoint ``file`` holds the streams after ``after_block``."""
        self.stream_checkpoint = {"after_block": after_block, "file": _check_relative(file), "sha256": sha256}

    def first_unfinished_block(self) -> int:
        """Index of the first block not done, or ``n_blocks`` if all are done."""
        for record in self.blocks:
            if record.status != DONE:
                return record.index
        return self.n_blocks

    def added_biases(self) -> set[str]:
        """The linears (block-relative names) a repair of some block gave a new bias."""
        return {name for record in self.blocks for name in record.stats.get("added_biases", [])}

    def check_same_job(self, fingerprint: dict[str, object], out_dir: Path, flags: Mapping[str, str]) -> None:
        """Refuse to resume a different job in the same folder (``JobFolder.check_same_job``, naming by ``flags``).

        Raises:
            ValueError: one line listing every changed flag and the ways out.
        """
        JobFolder(out_dir, RUN_JOB).check_same_job(self.fingerprint, fingerprint, flags)


# ---------------------------------------------------------------------- file checks
def _file_ok(path: Path, expected: str | None) -> bool:
    try:
        return expected is not None and sha256_file(path) == expected
    except OSError:
        return False


def _block_file_ok(record: BlockRecord, out_dir: Path) -> bool:
    """True when the block's file is intact: unchanged stat since it was written, or else its sha256."""
    if record.file is None:
        return False
    path = out_dir / record.file
    try:
        if record.stat is not None and file_stat(path) == record.stat:
            return True  # not re-read: see the trade-off in reconstruct/state/fingerprint.py
    except OSError:
        return False
    crash_point(f"verify:{record.file}")  # tests: prove which files a resume reads
    return _file_ok(path, record.sha256)


def verify_block_files(manifest: Manifest, out_dir: Path, workers: int = 4) -> list[int]:
    """Check every finished block's file; mark missing or changed ones pending.

    A file whose size, mtime, ctime and inode are those recorded when it was written is trusted
    without reading it (a 30B model's 60 GB are not re-hashed at every resume); any other is
    re-hashed against its recorded sha256.

    Args:
        manifest: The loaded manifest; modified in place (call ``save`` afterwards).
        out_dir: The output folder the block files are relative to.
        workers: Files hashed in parallel (hashlib releases the GIL).

    Returns:
        Sorted indices of blocks that were marked done but whose file is missing, truncated or
        corrupted; they are now pending and must be recomputed.
    """
    out_dir = Path(out_dir)
    done = [r for r in manifest.blocks if r.status == DONE]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        verdicts = list(pool.map(lambda r: _block_file_ok(r, out_dir), done))
    broken = [r.index for r, ok in zip(done, verdicts) if not ok]
    for index in broken:
        logger.warning("block %d of %d: file %s is missing or damaged; it will be recomputed",
                       index + 1, manifest.n_blocks, manifest.blocks[index].file)
        manifest.mark_block_pending(index)
    return broken


def verify_stream_checkpoint(manifest: Manifest, out_dir: Path) -> bool:
    """Check that the recorded activation checkpoint exists and is intact.

    A missing or damaged checkpoint is forgotten (``stream_checkpoint`` set to ``None``), so the
    engine rebuilds the streams from block 0.

    Returns:
        True if a checkpoint is recorded and its file's sha256 matches.
    """
    checkpoint = manifest.stream_checkpoint
    if checkpoint is None:
        return False
    if _file_ok(Path(out_dir) / checkpoint["file"], checkpoint["sha256"]):
        return True
    logger.warning("activation checkpoint %s is missing or damaged; the streams will be rebuilt",
                   checkpoint["file"])
    manifest.stream_checkpoint = None
    return False
