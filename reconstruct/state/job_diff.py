"""How two job fingerprints differ, said in the flags a user changes.

A resume compares the fingerprint stored in the job's record with the one of the job asked for now
(``reconstruct.state.job_folder.JobFolder.check_same_job``, for ``run``, ``retrain`` and ``shrink``);
this module flattens both, lists the fields that differ and names each by its flag through the job's
map of fields to flags (``method.steps`` → ``--recon-steps``).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections.abc import Mapping
from pathlib import Path

from reconstruct.config import DEVICE, DTYPE, MODEL

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


# Fingerprint fields are labelled by the flags a user changes: each job's fingerprint module holds its map
# (``jobs.run_fingerprint.RUN_FINGERPRINT_FLAGS``, read from the specs that own the flags). A field
# (flattened: ``method.steps``) takes the entry of its longest listed prefix; ``{rest}`` is the rest of the
# field (the file behind ``model_files.<name>``); fields no flag sets keep their own name.

FILE_CONTENTS = " (the file's contents)"  # a file source's sha256 is labelled by its flag and this

# Every job's setup (``reconstruct.state.job_folder.setup_fingerprint``), named alike by every command.
SETUP_FLAGS: dict[str, str] = {
    "model_files": MODEL.name + " (its file {rest})",
    "dtype": DTYPE.name,
    "device_type": DEVICE.name,
    WORLD_SIZE_KEY: "--nproc",
    "versions": "the installed {rest}",
}


def flag_of_field(key: str, flags: Mapping[str, str]) -> str:
    """The flag behind a flattened fingerprint field (``method.steps`` → ``--recon-steps``).

    Args:
        key: the field, flattened (``model_files.model.safetensors``).
        flags: the job's labels (``jobs.run_fingerprint.RUN_FINGERPRINT_FLAGS``, ...).

    Returns:
        The flag (with what it names, as ``--model (its file model.safetensors)``), else ``key``.
    """
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
