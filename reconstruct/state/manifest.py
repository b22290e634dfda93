"""The resume record of a job: ``<out>/reconstruct-manifest.json``.

It stores what determines the result (the *fingerprint*), which blocks are finished (file name and
sha256 of each block's tensors) and where the activation checkpoint stands. A resumed run compares
fingerprints (:func:`diff_fingerprints`, :meth:`Manifest.check_same_job`), re-checks the finished
block files (:func:`verify_block_files`) and continues at :meth:`Manifest.first_unfinished_block`.
The file is rewritten atomically after every change, so a crash leaves the previous version.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from reconstruct.state.atomic import atomic_write_json, sha256_file
from reconstruct.state.faults import crash_point
from reconstruct.state.fingerprint import file_stat

logger = logging.getLogger(__name__)

MANIFEST_NAME = "reconstruct-manifest.json"
MANIFEST_VERSION = 1
PENDING = "pending"
DONE = "done"
_ABSENT = "<absent>"
WORLD_SIZE_KEY = "world_size"  # fingerprint key: processes of a distributed job (absent: one)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _json_default(obj):
    """JSON encoding for the values a fingerprint or a stats dict typically holds."""
    if isinstance(obj, Path):
        return obj.as_posix()
    if isinstance(obj, enum.Enum):
        return obj.value
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    if type(obj).__module__ == "torch" and type(obj).__name__ == "dtype":  # torch.float16 → "float16"
        return str(obj).removeprefix("torch.")
    raise TypeError(f"{type(obj).__name__} {obj!r} is not JSON-serialisable")


def to_jsonable(obj):
    """Return ``obj`` as it reads back from JSON (tuples → lists, Paths/enums/dtypes → str...).

    Raises:
        TypeError: for values with no faithful JSON form.
    """
    return json.loads(json.dumps(obj, default=_json_default, sort_keys=True))


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

    def set_stream_checkpoint(self, after_block: int, file: str, sha256: str) -> None:
        """Record that the activation checkpoint ``file`` holds the streams after ``after_block``."""
        self.stream_checkpoint = {"after_block": after_block, "file": _check_relative(file), "sha256": sha256}

    def first_unfinished_block(self) -> int:
        """Index of the first block not done, or ``n_blocks`` if all are done."""
        for record in self.blocks:
            if record.status != DONE:
                return record.index
        return self.n_blocks

    def check_same_job(self, fingerprint: dict[str, object], out_dir: Path) -> None:
        """Refuse to resume a different job in the same folder.

        Raises:
            ValueError: one line listing every changed field and the two ways out.
        """
        check_same_world_size(self.fingerprint, fingerprint, out_dir)
        changes = diff_fingerprints(self.fingerprint, fingerprint, label=flag_of_field)
        if changes:
            raise ValueError(
                f"--out {out_dir} holds a different job ({'; '.join(changes)}); rerun with the "
                f"original arguments to resume, choose another --out, or pass --force to start over"
            )


# ---------------------------------------------------------------------- fingerprints
def check_same_world_size(old: dict, new: dict, out_dir: Path) -> None:
    """Refuse to resume with another number of processes than the job started with.

    Another count splits the calibration samples differently, so float sums (statistics, gradients)
    round differently and a resumed job would not write the bytes of an uninterrupted one. A
    fingerprint without ``WORLD_SIZE_KEY`` was made by one process.

    Raises:
        ValueError: one line naming ``--nproc``, both counts and the ways out.
    """
    before, now = old.get(WORLD_SIZE_KEY, 1), new.get(WORLD_SIZE_KEY, 1)
    if before != now:
        raise ValueError(
            f"--nproc: --out {out_dir} was started with {before} process(es) and this run has {now}; resume with "
            f"--nproc {before} (under torchrun: {before} processes in all), or pass --force to start over"
        )


# Fingerprint field (``reconstruct.state.job_state.job_fingerprint``, flattened) → the flag a user changes.
# A field takes the entry of its longest listed prefix; fields no flag sets keep their own name.
FINGERPRINT_FLAGS: dict[str, str] = {
    "model_files": "--model (its file {rest})",
    "model_type": "--model",
    "pruner": "--pruner",
    "pattern.kind": "--pattern",
    "pattern.n": "--pattern",
    "pattern.m": "--pattern",
    "pattern.sparsity": "--sparsity",
    "pattern.scope": "--mask-scope",
    "sequential": "--sequential",
    "loraprune.steps": "--loraprune-steps",
    "loraprune.rank": "--loraprune-rank",
    "loraprune.lr": "--loraprune-lr",
    "cycles.cycles": "--cycles",
    "cycles.schedule": "--cycle-schedule",
    "cycles": "--cycles",
    "method": "--method",
    "method.method": "--method",
    "method.steps": "--recon-steps",
    "method.lr": "--lr",
    "method.rank": "--rank",
    "method.alpha": "--alpha",
    "method.batch_size": "--recon-batch",
    "method.weight_decay": "--weight-decay",
    "method.allow_dense_merge": "--allow-dense-merge",
    "method.granularity": "--granularity",
    "method.target": "--target",
    "calibration.source": "--calib",
    "calibration.source.sha256": "--calib (the file's contents)",
    "calibration.n_samples": "--n-samples",
    "calibration.seq_len": "--seq-len",
    "seed": "--seed",
    "dtype": "--dtype",
    "device_type": "--device",
    "micro_batch": "--micro-batch",
    "track_error": "--track-error",
    "calibration.bos_id": "--calib-bos",
}


def flag_of_field(key: str) -> str:
    """The flag behind a flattened fingerprint field (``method.steps`` → ``--recon-steps``), else the field."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        flag = FINGERPRINT_FLAGS.get(".".join(parts[:end]))
        if flag is not None:
            return flag.format(rest=".".join(parts[end:]))  # e.g. the file behind model_files.<name>
    return key


def _flatten(obj, prefix: str = "") -> dict[str, object]:
    if isinstance(obj, dict) and obj:
        flat: dict[str, object] = {}
        for key, value in obj.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: obj}


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _show(value) -> str:
    if value is _ABSENT:
        return _ABSENT
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def diff_fingerprints(old: dict, new: dict, label=None) -> list[str]:
    """Human-readable differences between two fingerprints.

    Nested dicts are flattened to dotted keys; values are compared in their JSON form, so a tuple
    equals the list it was saved as, and ``True`` differs from ``1``.

    Args:
        old: The fingerprint on disk.
        new: The fingerprint of the job being started.
        label: names a flattened field in the lines (default: the field itself); ``flag_of_field``
            names the flag instead. Fields with the same label are listed once.

    Returns:
        One line per differing field, sorted by key, e.g. ``"sparsity: 0.5 (on disk) vs 0.6 (now)"``;
        empty if they match.
    """
    flat_old = _flatten(to_jsonable(old))
    flat_new = _flatten(to_jsonable(new))
    lines, named = [], set()
    for key in sorted(flat_old.keys() | flat_new.keys()):
        a = flat_old.get(key, _ABSENT)
        b = flat_new.get(key, _ABSENT)
        name = label(key) if label is not None else key
        if (a is _ABSENT or b is _ABSENT or not _same(a, b)) and name not in named:
            named.add(name)
            lines.append(f"{name}: {_show(a)} (on disk) vs {_show(b)} (now)")
    return lines


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
