"""Where model-level retraining stands in an output folder, for ``reconstruct status``.

Reads the manifests, the stage record and the checkpoint's header only: never the weights, never
the lock, never writes. Safe while the job runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from reconstruct.modelio.folder_layout import RETRAIN_CHECKPOINT_NAME as CHECKPOINT_NAME
from reconstruct.modelio.folder_layout import RETRAIN_MANIFEST_NAME as MANIFEST_NAME
from reconstruct.modelio.folder_layout import STATE_DIR
from reconstruct.state.retrain_stage_record import read_stage


def saved_step(out: Path) -> int:
    """Optimizer steps the last training checkpoint in ``out`` holds (0 when there is none or it is unreadable)."""
    path = Path(out) / STATE_DIR / CHECKPOINT_NAME
    if not path.is_file():
        return 0
    try:
        with safe_open(path, framework="pt") as handle:
            return int((handle.metadata() or {}).get("step", 0))
    except (OSError, ValueError):  # being replaced, or damaged: the run decides what to do with it
        return 0


def stage_progress(out: Path, steps: int, layerwise_finished: bool) -> str:
    """One line on ``run --retrain-steps``: waiting for the loop, step k of N, swapping, finished.

    Args:
        out: the run's output folder.
        steps: the stage's ``--retrain-steps``.
        layerwise_finished: whether the layer-wise loop has finished (the run's manifest says so).
    """
    stage = read_stage(out)
    if stage.get("finished"):
        return f"finished ({steps} of {steps} steps)"
    if stage.get("staged"):
        return f"trained ({steps} of {steps} steps); the retrained blocks are being swapped in"
    if not layerwise_finished:
        return f"{steps} steps after the layer-wise loop (not started)"
    return f"step {saved_step(out)} of {steps} (last checkpoint)"


def describe_retrain_job(out: Path, holder: int | None) -> str | None:
    """A few lines on the ``reconstruct retrain`` job in ``out``, or None when ``out`` holds none.

    Args:
        out: the ``--out`` of ``reconstruct retrain``.
        holder: pid of the live process holding the lock, or None.

    Raises:
        ValueError: the retraining manifest is damaged.
    """
    path = Path(out) / STATE_DIR / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        spec = manifest["fingerprint"]["retrain"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is damaged ({error}); the next reconstruct retrain starts the training over") from None
    running = f"running: pid {holder} holds the lock" if holder is not None else None
    step = spec["steps"] if manifest.get("finished") else saved_step(out)
    if manifest.get("finished"):
        state = "finished" + (f" ({running})" if running else "")
    elif running:
        state = f"in progress ({running})"
    else:
        state = "interrupted (no process holds the lock; rerun the same command to resume)" if step else \
            "not started (no process holds the lock; rerun the same command to start)"
    data = manifest["fingerprint"].get("data", {})
    return "\n".join([
        f"job:        {out} (reconstruct retrain)",
        f"state:      {state}",
        f"retrain:    step {step} of {spec['steps']}" + ("" if manifest.get("finished") else " (last checkpoint)"),
        f"method:     {spec.get('method', '?')}, lr {spec.get('lr', '?')}, batch {spec.get('batch', '?')} x "
        f"{spec.get('seq_len', '?')} tokens",
        f"data:       {data.get('file') or data.get('name', '?')}",
        f"seed:       {spec.get('seed', '?')}, dtype {manifest['fingerprint'].get('dtype', '?')}",
    ])
