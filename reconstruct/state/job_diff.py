"""How two job fingerprints differ, said in the flags a user changes.

A resume compares the fingerprint stored in the job's record with the one of the job asked for now
(``reconstruct.state.job_folder.JobFolder.check_same_job``, for ``run``, ``retrain`` and ``shrink``);
this module flattens both, lists the fields that differ and names each by its flag through the one
map of fields to flags, ``FINGERPRINT_FLAGS`` (``method.steps`` → ``--recon-steps``).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from pathlib import Path

_ABSENT = "<absent>"
WORLD_SIZE_KEY = "world_size"  # fingerprint key: processes of a distributed job (absent: one)


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



def check_same_world_size(old: dict, new: dict, out_dir: Path, start_over: str = "pass --force to start over") -> None:
    """Refuse to resume with another number of processes than the job started with.

    Another count splits the calibration samples differently, so float sums (statistics, gradients)
    round differently and a resumed job would not write the bytes of an uninterrupted one. A
    fingerprint without ``WORLD_SIZE_KEY`` was made by one process.

    Args:
        old: the fingerprint on disk.
        new: the fingerprint of the job asked for now.
        out_dir: the job's folder, for the message.
        start_over: the message's other way out (``run``: ``--force``).

    Raises:
        ValueError: one line naming ``--nproc``, both counts and the ways out.
    """
    before, now = old.get(WORLD_SIZE_KEY, 1), new.get(WORLD_SIZE_KEY, 1)
    if before != now:
        raise ValueError(
            f"--nproc: --out {out_dir} was started with {before} process(es) and this run has {now}; resume with "
            f"--nproc {before} (under torchrun: {before} processes in all), or {start_over}"
        )


# The one map from fingerprint fields to the flags a user changes, a section per kind of job. A field
# (flattened: ``method.steps``) takes the entry of its longest listed prefix; ``{rest}`` is the rest of the
# field (the file behind ``model_files.<name>``); fields no flag sets keep their own name.

# Every job's setup (``reconstruct.state.job_folder.setup_fingerprint``), named alike by every command.
SETUP_FLAGS: dict[str, str] = {
    "model_files": "--model (its file {rest})",
    "dtype": "--dtype",
    "device_type": "--device",
    WORLD_SIZE_KEY: "--nproc",
    "versions": "the installed {rest}",
}

# The retraining settings (``RetrainSpec.fingerprint()``) by the flags of ``reconstruct retrain``.
RETRAIN_SPEC_FLAGS: dict[str, str] = {
    "method": "--method",
    "steps": "--steps",
    "batch": "--samples-per-step",
    "micro_batch": "--batch-size",
    "seq_len": "--seq-len",
    "lr": "--lr",
    "warmup": "--warmup",
    "weight_decay": "--weight-decay",
    "rank": "--rank",
    "alpha": "--alpha",
    "seed": "--seed",
    "n_windows": "--n-samples",
    "val_fraction": "--val",
    "eval_every": "--eval-every",
    "allow_dense_merge": "--allow-dense-merge",
}
# ``run --retrain-steps``: these are ``--retrain-<flag>``; rank, alpha, seed, --batch-size and
# --allow-dense-merge are the run's own flags; the others keep their defaults (named by ``retrain``).
RUN_STAGE_FLAGS = ("method", "steps", "batch", "seq_len", "lr", "n_windows", "val_fraction")
RUN_SHARED_FLAGS = ("rank", "alpha", "seed", "micro_batch", "allow_dense_merge")

# reconstruct run (``reconstruct.jobs.run_fingerprint.job_fingerprint``)
FINGERPRINT_FLAGS: dict[str, str] = {
    **SETUP_FLAGS,
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
    "loraprune.objective": "--loraprune-objective",
    "cycles.cycles": "--cycles",
    "cycles.schedule": "--cycle-schedule",
    "cycles": "--cycles",
    "method": "--method",
    "method.method": "--method",
    "method.steps": "--recon-steps",
    "method.lr": "--lr",
    "method.rank": "--rank",
    "method.alpha": "--alpha",
    "method.batch_size": "--recon-samples-per-step",
    "method.weight_decay": "--weight-decay",
    "method.allow_dense_merge": "--allow-dense-merge",
    "method.granularity": "--granularity",
    "method.target": "--target",
    "method.loss": "--recon-loss",
    "calibration.source": "--calib",
    "calibration.source.sha256": "--calib (the file's contents)",
    "calibration.n_samples": "--n-samples",
    "validation": "--recon-val-data",
    "validation.source.sha256": "--recon-val-data (the file's contents)",
    "validation.n_samples": "--recon-val-samples",
    "calibration.seq_len": "--seq-len",
    "seed": "--seed",
    "retrain": "--retrain-steps",
    **{f"retrain.{field}": "--retrain-" + RETRAIN_SPEC_FLAGS[field].removeprefix("--") for field in RUN_STAGE_FLAGS},
    **{f"retrain.{field}": RETRAIN_SPEC_FLAGS[field] for field in RUN_SHARED_FLAGS},
    "retrain.data": "--retrain-data",
    "retrain.data.sha256": "--retrain-data (the file's contents)",
    "micro_batch": "--batch-size",
    "track_error": "--track-error",
    "calibration.bos_id": "--calib-bos",
    "allocation": "--allocation",
    "allocation.kind": "--allocation",
    "allocation.sha256": "--allocation (the file's contents)",
    "allocation.owl_m": "--owl-m",
    "allocation.owl_lambda": "--owl-lambda",
}
# reconstruct retrain (``reconstruct.jobs.retrain_job.retrain_fingerprint``)
RETRAIN_FINGERPRINT_FLAGS: dict[str, str] = {
    **SETUP_FLAGS,
    "data": "--data",
    "data.sha256": "--data (the file's contents)",
    "bos_id": "--calib-bos",
    **{f"retrain.{field}": flag for field, flag in RETRAIN_SPEC_FLAGS.items()},
}
# reconstruct shrink (``reconstruct.shrink``: the folder shrunk and what it removes; no flag sets either)
SHRINK_FINGERPRINT_FLAGS: dict[str, str] = {
    "source": "the model folder (its file {rest})",
    "plan": "the heads and channels removed",
}
COMMAND_FLAGS = {"run": FINGERPRINT_FLAGS, "retrain": RETRAIN_FINGERPRINT_FLAGS, "shrink": SHRINK_FINGERPRINT_FLAGS}


def flag_of_field(key: str, command: str = "run") -> str:
    """The flag behind a flattened fingerprint field of ``command``'s jobs (``method.steps`` → ``--recon-steps``).

    Args:
        key: the field, flattened (``model_files.model.safetensors``).
        command: ``run``, ``retrain`` or ``shrink``: its section of the map (``COMMAND_FLAGS``).

    Returns:
        The flag (with what it names, as ``--model (its file model.safetensors)``), else ``key``.
    """
    flags = COMMAND_FLAGS[command]
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        flag = flags.get(".".join(parts[:end]))
        if flag is not None:
            return flag.format(rest=".".join(parts[end:]))
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
