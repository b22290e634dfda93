"""``--pruner loraprune --loraprune-objective model``: LoRAPrune over the whole model, before block 0.

LoRA adapters on every block linear are trained on the causal-LM loss over the calibration windows
with the model-level trainer (``reconstruct.retrain``: streamed one block at a time when the model
does not fit, resident otherwise), and ``pruners.loraprune_training``'s hooks prune the model on
LoRAPrune's schedule while it trains. The final keep masks, exactly at each block's target, are
written per block to ``--out/.reconstruct/loraprune/masks-<block>.safetensors`` (atomically, rank 0)
and recorded in the manifest with the schedule and the loss curve, so a resume does not train
again. A job killed during the stage continues from its last checkpoint (``--checkpoint-every``
steps): the trainer's (adapters, AdamW, step) and the controller's (moving averages, masks,
schedule history) of the same step, so it ends with the same masks as an uninterrupted run. The per-block loop then prunes each block with its stored masks and ``--method``
repairs it as after any pruner.

The adapters are dropped, not merged: their job is to measure importance. Merging plain LoRA would
refill the pruned positions; merging through MaskLoRA (``M * (W + s B A)``) would keep the zeros,
but the block loop's ``--method`` then starts from weights shifted by a delta trained under the
provisional masks of earlier steps, which nothing here checks against a dense target; dropping
leaves ``--method`` (layer-wise, toward the dense blocks) and ``--retrain-steps`` to repair.

Memory: the trainer's (one block plus boundary states when streamed); the controller's records
for heads and channels are a few floats per group in host memory; unstructured and N:M keep a
float32 average and a mask per weight in ``DiskImportanceStore`` under ``.reconstruct/loraprune/``
(5 bytes a prunable weight on disk, one block's record in memory), removed after the stage.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

from calib.activations import ActivationStream
from pruners.layers import weight_as_out_in
from pruners.loraprune import ALPHA_PER_RANK
from pruners.loraprune_model import BlockLayout, HostImportanceStore, LoRAPruneController, LoRAPruneSchedule
from pruners.loraprune_training import LoRAPruneHooks, iter_final_masks
from pruners.structured import find_groups
from reconstruct.config import JobConfig
from reconstruct.loop.pipeline import BlockPipeline
from reconstruct.modelio.loaded import LoadedModel
from reconstruct.parallel import distributed
from reconstruct.retrain.checkpoint import checkpoint_interval, load_checkpoint
from reconstruct.planner.budget import human
from reconstruct.retrain.engine import Checkpointing, RetrainResult, Trainer, open_model
from reconstruct.retrain.memory import choose_stream
from reconstruct.retrain.engine import train as train_steps
from reconstruct.retrain.memory import RetrainMemory, estimate
from reconstruct.retrain.session import BlockLoader
from reconstruct.retrain.spec import RetrainSpec
from reconstruct.retrain.trainables import ModelTrainables
from reconstruct.atomic import save_safetensors_atomic, sha256_file
from reconstruct.faults import crash_point
from reconstruct.state.importance_store import DiskImportanceStore
from reconstruct.jobs.calibration_tokens import calibration_tokens
from reconstruct.jobs.job_state import JobState

logger = logging.getLogger(__name__)

STAGE_DIR = "loraprune"  # under --out/.reconstruct/
BATCH = 2  # calibration windows per optimizer step (fewer when there are fewer windows)
TRAINER_CHECKPOINT = "train-checkpoint.safetensors"  # the trainer's state, in the stage folder


class StageHooks(LoRAPruneHooks):
    """LoRAPrune's hooks, saving the controller with the trainer's checkpoints; a crash point after every step.

    The trainer saves its checkpoint of step ``s`` right after ``step_done(s)``; the controller's
    state of step ``s`` is saved here first, and the one before it kept, so the trainer's newest
    checkpoint always has its controller state (``loraprune-step:<s>`` kills the run in between).

    Args:
        controller: the importance, masks and schedule of every block.
        checkpoints: where the controller's states go, and when.
        start_step: the steps already taken (a resumed stage).
    """

    def __init__(self, controller: LoRAPruneController, checkpoints: StageCheckpoints, start_step: int = 0) -> None:
        super().__init__(controller, start_step)
        self.checkpoints = checkpoints

    def step_done(self, step: int) -> None:
        """See :meth:`LoRAPruneHooks.step_done`; then the controller's checkpoint when the trainer saves one."""
        super().step_done(step)
        if self.checkpoints.due(step, self.controller.schedule.total_steps):
            self.checkpoints.save(step, self.controller.checkpoint(step))
        crash_point(f"loraprune-step:{step}")


@dataclass
class StageCheckpoints:
    """The stage's training checkpoints: the trainer's file and the controller's states next to it."""

    folder: Path  # --out/.reconstruct/loraprune
    every: int  # steps between checkpoints (the trainer's ``Checkpointing.every``)

    @property
    def trainer(self) -> Checkpointing:
        """The trainer's checkpoint settings."""
        return Checkpointing(path=self.folder / TRAINER_CHECKPOINT, every=self.every)

    def due(self, step: int, total: int) -> bool:
        """Whether the trainer saves a checkpoint after ``step`` (counted from 1)."""
        return step % self.every == 0 or step == total

    def _path(self, step: int) -> Path:
        return self.folder / f"controller-{step:08d}.safetensors"

    def save(self, step: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write the controller's state of ``step`` (rank 0); keep it and the one before."""
        if not distributed.is_main():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        save_safetensors_atomic(self._path(step), tensors)
        for older in sorted(self.folder.glob("controller-*.safetensors"))[:-2]:
            older.unlink()

    def load(self, step: int) -> dict[str, torch.Tensor]:
        """The controller's state of ``step``."""
        return load_file(self._path(step))

    def clear(self) -> None:
        """Remove the trainer's and the controller's checkpoints (the stage is recorded)."""
        if distributed.is_main():
            for path in [self.folder / TRAINER_CHECKPOINT, *self.folder.glob("controller-*.safetensors")]:
                path.unlink(missing_ok=True)


def check_stage_memory(job: JobConfig, loaded: LoadedModel) -> RetrainMemory:
    """Log the stage's memory on the path it will take (``reconstruct.retrain.memory``); refuse what cannot fit.

    Raises:
        ValueError: even streamed, the LoRA training does not fit: names the flags that shrink it.
    """
    spec = stage_spec(job)
    plan = estimate(spec, loaded, choose_stream(spec, loaded))
    logger.info("loraprune stage: %s", plan.format())
    if not plan.fits:
        raise ValueError(f"--loraprune-objective model: the LoRA training needs about {human(plan.total)} "
                         f"({'streamed' if plan.streamed else 'resident'}), {human(plan.available)} available; "
                         "lower --batch-size or --seq-len")
    return plan


def stage_spec(job: JobConfig) -> RetrainSpec:
    """The trainer's job: plain LoRA (never merged) at ``--loraprune-rank/-lr`` for ``--loraprune-steps`` steps.

    No learning-rate warm-up (the authors' ``warmup_steps=0``), linear decay, no held-out split: the
    stage measures importance, it does not pick a best step.
    """
    prune = job.prune
    n_windows, seq_len = job.calib.n_samples, job.calib.seq_len  # the calibration windows, (n, T)
    return RetrainSpec(
        method="lora", steps=prune.loraprune_steps, batch=min(BATCH, n_windows), micro_batch=job.micro_batch,
        seq_len=seq_len, lr=prune.loraprune_lr, warmup=0.0, weight_decay=0.0, rank=prune.loraprune_rank,
        alpha=ALPHA_PER_RANK * prune.loraprune_rank, seed=job.calib.seed, n_windows=n_windows, val_fraction=0.0,
        eval_every=prune.loraprune_steps, allow_dense_merge=True,
    )


def block_layouts(loaded: LoadedModel, pipeline: BlockPipeline, sparse: ActivationStream) -> list[BlockLayout]:
    """Every block's linears (shapes from the skeleton), groups (structured patterns) and target pattern.

    Structured patterns need the linears' call order: found on block 0, loaded for one forward on
    its first captured input (``sparse``), and kept by ``pipeline`` for the block loop.
    """
    layout = loaded.layout
    pattern = pipeline.block_pattern(0)
    shapes = {name: tuple(weight_as_out_in(loaded.blocks[0].get_submodule(name)).shape) for name in layout.linear_names}
    if pattern.structured and pipeline.structure is None:
        with loaded.visiting_block(0) as block:
            linears = {name: block.get_submodule(name) for name in layout.linear_names}
            order = pipeline.call_order(SimpleNamespace(block=block, linears=linears, sparse=sparse,
                                                        run=pipeline.block_runner(0)))
        pipeline.structure = find_groups(pattern, order, shapes, loaded.config)
    groups = pipeline.structure if pattern.structured else None
    return [BlockLayout(shapes=shapes, groups=groups, pattern=pipeline.block_pattern(index))
            for index in range(layout.n_blocks)]


def mask_path(state: JobState, index: int) -> Path:
    """Block ``index``'s final keep masks."""
    return state.state_dir / STAGE_DIR / f"masks-{index:05d}.safetensors"


def stage_checkpoints(job: JobConfig, folder: Path, spec: RetrainSpec, layouts: list[BlockLayout],
                      loaded: LoadedModel) -> StageCheckpoints:
    """How often the stage checkpoints (``--checkpoint-every``, ``auto``: a bounded share of a step's reads)."""
    weights = sum(out_f * in_f for layout in layouts for out_f, in_f in layout.shapes.values())
    adapters = sum(spec.rank * (out_f + in_f) for layout in layouts for out_f, in_f in layout.shapes.values())
    every = checkpoint_interval(job.checkpoint_every, 4 * adapters, weights * loaded.dtype.itemsize)
    return StageCheckpoints(folder, every)


def run_stage(job: JobConfig, loaded: LoadedModel, state: JobState, pipeline: BlockPipeline,
              sparse: ActivationStream) -> None:
    """Train, prune on the schedule, store the final masks and record the stage; nothing when it is recorded.

    Called while ``sparse`` holds block 0's inputs (structured patterns read one sample of it). A
    stage killed half-way continues from its last checkpoint (trainer and controller together).
    """
    if state.manifest.loraprune is not None:
        return
    tokens = calibration_tokens(state, loaded)  # (n, T): every rank's windows; the trainer splits them
    spec = stage_spec(job)
    layouts = block_layouts(loaded, pipeline, sparse)
    folder = state.state_dir / STAGE_DIR
    scratch = Path(state.scratch) if state.scratch else folder  # ranks other than 0 never write in --out
    store = (HostImportanceStore() if layouts[0].groups is not None  # per weight: on disk, rank 0's is the one resumed
             else DiskImportanceStore(scratch / "importance", published=folder / "importance"))
    controller = LoRAPruneController(layouts, LoRAPruneSchedule(total_steps=spec.steps), store,
                                     per_kv_group=job.prune.heads_per_kv_group)
    checkpoints = stage_checkpoints(job, folder, spec, layouts, loaded)
    saved = load_checkpoint(checkpoints.trainer.path)
    start = saved["step"] if saved is not None else 0
    controller.restore(start, checkpoints.load(start) if start else {"history": torch.zeros(0, 4)})
    result = RetrainResult(streamed=choose_stream(spec, loaded))
    logger.info("loraprune: %d steps of LoRA (rank %d) on the causal-LM loss over %d windows, %s%s",
                spec.steps, spec.rank, tokens.shape[0], "streamed" if result.streamed else "resident",
                f", resuming after step {start}" if start else "")

    def train(hooks: LoRAPruneHooks) -> None:
        trainables = ModelTrainables(spec, loaded.layout)
        model = open_model(BlockLoader(loaded, trainables, hooks), spec, result.streamed, scratch)
        try:
            train_steps(Trainer(model, trainables, spec, hooks), tokens, spec, result,
                        checkpointing=checkpoints.trainer, saved=saved)
        finally:
            model.close()

    train(StageHooks(controller, checkpoints, start))
    logger.info("loraprune: final sparsity %.4f after %d steps", controller.history[-1]["sparsity"], result.steps)
    files = {}
    if distributed.is_main():
        folder.mkdir(parents=True, exist_ok=True)
        for index, masks in enumerate(iter_final_masks(controller)):  # one block's masks in memory at a time
            path = mask_path(state, index)
            files[str(index)] = {"file": path.name, "sha256": save_safetensors_atomic(path, masks)}
    distributed.agree(lambda: None)  # every rank reads the files rank 0 wrote
    crash_point("loraprune-masks")
    state.record_loraprune({"files": files, "history": controller.history, "loss_curve": result.loss_curve,
                            "streamed": result.streamed, "steps": result.steps})  # no timings: resumes compare reports
    checkpoints.clear()
    if isinstance(store, DiskImportanceStore):
        shutil.rmtree(store.folder, ignore_errors=True)


def stored_masks(state: JobState, index: int) -> dict[str, torch.Tensor]:
    """Block ``index``'s final keep masks from the stage, ``{name: (out, in) bool}`` on the CPU.

    The file's sha256 must be the one the manifest recorded when the stage ended, so a mask file
    changed or damaged between the stage and a resume stops the job instead of pruning with it.

    Raises:
        RuntimeError: the file is missing or its content differs from the recorded one.
    """
    path = mask_path(state, index)
    recorded = ((state.manifest.loraprune or {}).get("files") or {}).get(str(index), {}).get("sha256")
    if not path.is_file():
        raise RuntimeError(f"loraprune: the mask file of block {index} ({path}) is missing; remove --out to start over")
    if recorded is not None and sha256_file(path) != recorded:
        raise RuntimeError(f"loraprune: the mask file of block {index} ({path}) differs from the one the stage "
                           "wrote (sha256 mismatch); remove --out to start over")
    return load_file(path)
