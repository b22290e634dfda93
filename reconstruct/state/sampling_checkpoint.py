"""The checkpoint of ``--calib self`` sampling in ``--out/.reconstruct/``, so Ctrl-C loses no token.

``calib.self_generated`` hands over a ``SamplingState`` after every chunk; it is saved here next
to where the finished tokens will go (``calibration-tokens.partial.safetensors``), atomically, with
what it belongs to (count, length, seed, framing) and the seconds spent. A rerun of the same job
continues from it; ``reconstruct status`` and the Ctrl-C message report how far it got.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from calib.self_generated import SamplingState
from reconstruct.atomic import save_safetensors_atomic

PARTIAL_SUFFIX = ".partial.safetensors"


def partial_path(tokens_path: Path) -> Path:
    """``calibration-tokens.safetensors`` → ``calibration-tokens.partial.safetensors``."""
    return tokens_path.with_name(tokens_path.name.removesuffix(".safetensors") + PARTIAL_SUFFIX)


def save_sampling(path: Path, state: SamplingState, key: dict, tokens_total: int, seconds: float) -> None:
    """Save ``state`` atomically with the job ``key`` it belongs to and the progress in its metadata."""
    tensors = {"done": state.done.contiguous(), "batch": state.batch.contiguous(),
               **{f"rng_{name}": value for name, value in state.rng.items()}}
    save_safetensors_atomic(path, tensors, {"key": json.dumps(key, sort_keys=True),
                                            "tokens_done": str(state.tokens_done()),
                                            "tokens_total": str(tokens_total), "seconds": f"{seconds:.3f}"})


def load_sampling(path: Path, key: dict) -> tuple[SamplingState, float] | None:
    """The saved state and its seconds, or None when absent, damaged or saved for another job."""
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            if json.loads(metadata.get("key", "null")) != json.loads(json.dumps(key, sort_keys=True)):
                return None
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        rng = {name.removeprefix("rng_"): value for name, value in tensors.items() if name.startswith("rng_")}
        return SamplingState(tensors["done"], tensors["batch"], rng), float(metadata.get("seconds", 0.0))
    except (OSError, ValueError, KeyError, RuntimeError):  # a damaged file: sample again
        return None


def sampling_progress(state_dir: Path) -> dict | None:
    """``{"label", "tokens_done", "tokens_total", "seconds"}`` of an unfinished sampling in ``state_dir``."""
    for path in sorted(Path(state_dir).glob("*" + PARTIAL_SUFFIX)):
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
            return {"label": path.name.removesuffix(PARTIAL_SUFFIX).removesuffix("-tokens"),
                    "tokens_done": int(metadata["tokens_done"]), "tokens_total": int(metadata["tokens_total"]),
                    "seconds": float(metadata.get("seconds", 0.0))}
        except (OSError, ValueError, KeyError, RuntimeError):
            continue
    return None


def describe_sampling(progress: dict) -> str:
    """``self-calibration: 616 of 1016 tokens sampled (kept: the same command continues from there)``."""
    return (f"self-{progress['label']}: {progress['tokens_done']} of {progress['tokens_total']} tokens sampled "
            "(kept: the same command continues from there)")

