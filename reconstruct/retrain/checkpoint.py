"""Training checkpoints: trainables, AdamW state, the best evaluation's trainables, step and curves.

One safetensors file in ``--out/.reconstruct/``, replaced atomically; the tensors are the state, the
header's metadata holds the step and the ``RetrainResult`` so far. The data position is the step
(``data.step_rows``), and training uses no random numbers after the adapters' seeded init, so a
resumed run takes exactly the steps an uninterrupted one would.

How often: ``every`` steps, or ``auto``: every step while a checkpoint costs at most
``AUTO_BUDGET`` of the bytes a step reads (the streamed path reads the model twice per step), else
the fewest steps apart that keep it there.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open

from reconstruct.retrain.trainables import ModelTrainables
from reconstruct.atomic import save_safetensors_atomic
from reconstruct.modelio.folder_layout import RETRAIN_CHECKPOINT_NAME as CHECKPOINT_NAME  # noqa: F401  (callers import it here)
from reconstruct.evaluation.streaming import model_bytes
from reconstruct.retrain.trainables import estimate_trainable_count

logger = logging.getLogger(__name__)

AUTO_BUDGET = 0.1  # auto: checkpoint bytes at most this share of the bytes a step reads
ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")


def checkpoint_interval(every: str | int, trainable_bytes: int, model_bytes: int) -> int:
    """Steps between checkpoints for ``--checkpoint-every`` (an int, or ``auto``).

    Raises:
        ValueError: neither ``auto`` nor a positive integer.
    """
    if every == "auto":
        checkpoint_bytes = 3 * trainable_bytes  # trainables + two AdamW moments (+ the best copy, small)
        return max(1, math.ceil(checkpoint_bytes / max(1.0, AUTO_BUDGET * 2 * model_bytes)))
    try:
        value = int(every)
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        raise ValueError(f"--checkpoint-every must be auto or a positive number of steps; got {every!r}")
    return value


def save_checkpoint(path: Path, *, step: int, trainables: ModelTrainables, optimizer: torch.optim.Optimizer | None,
                    best_state: dict | None, result) -> None:
    """Write the training state after ``step`` optimizer steps, atomically."""
    tensors = {f"param.{key}": value for key, value in trainables.state().items()}
    if best_state is not None:
        tensors.update({f"best.{key}": value for key, value in best_state.items()})
    if optimizer is not None:
        for position, param in enumerate(trainables.parameters()):
            for name, value in optimizer.state.get(param, {}).items():
                tensors[f"adam.{position}.{name}"] = value.detach().to("cpu")
    metadata = {"step": str(step), "result": json.dumps(asdict(result))}
    save_safetensors_atomic(path, tensors, metadata)


def load_checkpoint(path: Path) -> dict | None:
    """``{"step", "result", "params", "best", "adam"}`` from a checkpoint, or None when there is none."""
    if not path.is_file():
        return None
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}

    def section(prefix: str) -> dict[str, torch.Tensor]:
        return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}

    return {"step": int(metadata["step"]), "result": json.loads(metadata["result"]), "params": section("param."),
            "best": section("best.") or None, "adam": section("adam.")}


def restore_optimizer(optimizer: torch.optim.Optimizer, trainables: ModelTrainables, adam: dict) -> None:
    """Put the saved AdamW moments and step counts back, parameter by parameter."""
    for position, param in enumerate(trainables.parameters()):
        state = {name: adam[f"{position}.{name}"] for name in ADAM_KEYS if f"{position}.{name}" in adam}
        state.update({name: value.to(param.device) for name, value in state.items() if name != "step"})  # step: CPU
        if state:
            optimizer.state[param] = state


def auto_or_every(every: str | int, spec, loaded) -> int:
    """``checkpoint_interval`` for a job: the trainables' bytes estimated from the skeleton."""

    trainable_bytes = 4 * estimate_trainable_count(spec, loaded.layout, loaded.blocks)
    return checkpoint_interval(every, trainable_bytes, model_bytes(loaded.folder, loaded.dtype))
