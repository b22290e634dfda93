"""``--pruner loraprune --loraprune-objective model``: LoRAPrune over the whole model, before block 0.

LoRA adapters on every block linear are trained on the causal-LM loss over the calibration windows
with the model-level trainer (``reconstruct.retrain``: streamed one block at a time when the model
does not fit, resident otherwise), and ``pruners.loraprune_training``'s hooks prune the model on
LoRAPrune's schedule while it trains. The final keep masks, exactly at each block's target, are
written per block to ``--out/.reconstruct/loraprune/masks-<block>.safetensors`` (atomically, rank 0)
and recorded in the manifest with the schedule and the loss curve, so a resume does not train
again; a job killed during the stage trains again from step 0, which gives the same masks (every
seed is the job's). The per-block loop then prunes each block with its stored masks and ``--method``
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
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

from calib.activations import ActivationStream
from pruners.layers import weight_as_out_in
from pruners.loraprune import ALPHA_PER_RANK
from pruners.loraprune_model import BlockLayout, HostImportanceStore, LoRAPruneController, LoRAPruneSchedule
from pruners.loraprune_training import LoRAPruneHooks, prune_while_training
from pruners.structured import find_groups
from reconstruct.config import JobConfig
from reconstruct.loop.pipeline import BlockPipeline
from reconstruct.modelio.block_io import load_module_weights, release_module_weights
from reconstruct.modelio.loaded import LoadedModel
from reconstruct.parallel import distributed
from reconstruct.retrain.engine import RetrainResult, Trainer, choose_stream, open_model
from reconstruct.retrain.engine import train as train_steps
from reconstruct.retrain.session import BlockLoader
from reconstruct.retrain.spec import RetrainSpec
from reconstruct.retrain.trainables import ModelTrainables
from reconstruct.state.atomic import save_safetensors_atomic
from reconstruct.state.faults import crash_point
from reconstruct.state.importance_store import DiskImportanceStore
from reconstruct.state.job_state import JobState

logger = logging.getLogger(__name__)

STAGE_DIR = "loraprune"  # under --out/.reconstruct/
BATCH = 2  # calibration windows per optimizer step (fewer when there are fewer windows)


class StageHooks(LoRAPruneHooks):
    """LoRAPrune's hooks with a crash point after every step (``loraprune-step:<step>``, for the resume tests)."""

    def step_done(self, step: int) -> None:
        """See :meth:`LoRAPruneHooks.step_done`."""
        super().step_done(step)
        crash_point(f"loraprune-step:{step}")


def is_model_level(job: JobConfig) -> bool:
    """True for ``--pruner loraprune --loraprune-objective model``."""
    return job.prune.pruner == "loraprune" and job.prune.loraprune_objective == "model"


def stage_spec(job: JobConfig, tokens: torch.Tensor) -> RetrainSpec:
    """The trainer's job: plain LoRA (never merged) at ``--loraprune-rank/-lr`` for ``--loraprune-steps`` steps.

    No learning-rate warm-up (the authors' ``warmup_steps=0``), linear decay, no held-out split: the
    stage measures importance, it does not pick a best step.
    """
    prune = job.prune
    n_windows, seq_len = tokens.shape
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
        block = loaded.blocks[0]
        load_module_weights(block, layout.block_prefix(0), loaded.reader, loaded.key_map, loaded.device, loaded.dtype)
        loaded.reader.close()
        try:
            linears = {name: block.get_submodule(name) for name in layout.linear_names}
            order = pipeline.call_order(SimpleNamespace(block=block, linears=linears, sparse=sparse))
        finally:
            release_module_weights(block)
        pipeline.structure = find_groups(pattern, order, shapes, loaded.config)
    groups = pipeline.structure if pattern.structured else None
    return [BlockLayout(shapes=shapes, groups=groups, pattern=pipeline.block_pattern(index))
            for index in range(layout.n_blocks)]


def mask_path(state: JobState, index: int) -> Path:
    """Block ``index``'s final keep masks."""
    return state.state_dir / STAGE_DIR / f"masks-{index:05d}.safetensors"


def run_stage(job: JobConfig, loaded: LoadedModel, state: JobState, pipeline: BlockPipeline,
              sparse: ActivationStream) -> None:
    """Train, prune on the schedule, store the final masks and record the stage; nothing when it is recorded.

    Called while ``sparse`` holds block 0's inputs (structured patterns read one sample of it).
    """
    if state.manifest.loraprune is not None:
        return
    tokens = state.calibration_tokens(loaded)  # (n, T): every rank's windows; the trainer splits them
    spec = stage_spec(job, tokens)
    layouts = block_layouts(loaded, pipeline, sparse)
    folder = state.state_dir / STAGE_DIR
    scratch = Path(state.scratch) if state.scratch else folder  # ranks other than 0 never write in --out
    store = HostImportanceStore() if layouts[0].groups is not None else DiskImportanceStore(scratch / "importance")
    store.restore(0, {})  # an interrupted earlier attempt trained for nothing: start again at step 0
    controller = LoRAPruneController(layouts, LoRAPruneSchedule(total_steps=spec.steps), store,
                                     per_kv_group=job.prune.heads_per_kv_group)
    result = RetrainResult(streamed=choose_stream(spec, loaded))
    logger.info("loraprune: %d steps of LoRA (rank %d) on the causal-LM loss over %d windows, %s",
                spec.steps, spec.rank, tokens.shape[0], "streamed" if result.streamed else "resident")

    def train(hooks: LoRAPruneHooks) -> None:
        trainables = ModelTrainables(spec, loaded.layout)
        model = open_model(BlockLoader(loaded, trainables, hooks), spec, result.streamed, scratch)
        try:
            train_steps(Trainer(model, trainables, spec, hooks), tokens, spec, result)
        finally:
            model.close()

    finals = prune_while_training(train, controller, hooks=StageHooks(controller))
    logger.info("loraprune: final sparsity %.4f after %d steps, %.2f s a step", controller.history[-1]["sparsity"],
                result.steps, result.seconds_per_step)
    files = {}
    if distributed.is_main():
        folder.mkdir(parents=True, exist_ok=True)
        for index, masks in enumerate(finals):
            path = mask_path(state, index)
            files[str(index)] = {"file": path.name, "sha256": save_safetensors_atomic(path, masks)}
    del finals
    distributed.agree(lambda: None)  # every rank reads the files rank 0 wrote
    crash_point("loraprune-masks")
    state.record_loraprune({"files": files, "history": controller.history, "loss_curve": result.loss_curve,
                            "streamed": result.streamed, "steps": result.steps})  # no timings: resumes compare reports
    if isinstance(store, DiskImportanceStore):
        shutil.rmtree(store.folder, ignore_errors=True)


def stored_masks(state: JobState, index: int) -> dict[str, torch.Tensor]:
    """Block ``index``'s final keep masks from the stage, ``{name: (out, in) bool}`` on the CPU."""
    return load_file(mask_path(state, index))
