"""The driver of model-level retraining: data, the training loop with held-out validation, the output.

    report = retrain_model(loaded, spec, data="../shared/data/wikitext-2/valid.txt", out=Path("out"))

Every ``eval_every`` steps (and after the last) the held-out windows are scored; the trainables of the
best evaluation are kept. If no evaluation beats the untrained model on them, the blocks are written
exactly as loaded, and the report says so (issue 20's rule). Without held-out windows (``val_fraction``
0 or one window) the last step's trainables are merged. Training and validation use one loss
(``RetrainSpec.loss``; with distillation, the teacher's top-k rows of the windows scored).
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from calib.framing import SequenceFraming
from reconstruct.modelio.block_reads import BlockReads
from reconstruct.modelio.loaded import LoadedModel
from reconstruct.modelio.output import STATE_DIR
from reconstruct.parallel import distributed
from reconstruct.retrain.checkpoint import load_checkpoint, restore_optimizer, save_checkpoint
from reconstruct.progress import progress_bar
from reconstruct.retrain.data import held_out_split, retrain_windows, step_rows
from reconstruct.retrain.distill import TeacherTopK
from reconstruct.retrain.hooks import NoHooks, RetrainHooks
from reconstruct.retrain.loss import Objective, scored_tokens
from reconstruct.retrain.memory import boundary_tier, choose_stream
from reconstruct.retrain.output import write_block, write_rest
from reconstruct.retrain.resident import ResidentModel
from reconstruct.retrain.schedule import lr_factor
from reconstruct.retrain.session import BlockLoader
from reconstruct.retrain.spec import RetrainSpec
from reconstruct.retrain.streamed import StreamedModel
from reconstruct.retrain.trainables import ModelTrainables
from reconstruct.runtime import peak_gpu_mb, peak_rss_mb
from reconstruct.faults import crash_point

logger = logging.getLogger(__name__)

MAX_GRAD_NORM = 1.0  # global gradient-norm clip (the Hugging Face Trainer's default, which PERP used)


@dataclass
class RetrainResult:
    """What the training did; the ``retrain`` section of ``reconstruct.json``."""

    streamed: bool  # blocks streamed (True) or the model held resident
    steps: int = 0  # optimizer steps taken
    loss_curve: list[float] = field(default_factory=list)  # mean token loss of each step's windows
    val_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss); step 0 = untrained
    val_before: float | None = None  # held-out loss of the untrained model
    val_best: float | None = None  # held-out loss of the trainables kept
    best_step: int | None = None  # step whose trainables were kept (0: none, the input is written unchanged)
    kept: bool = True  # whether the trained parameters were merged into the output
    trainable_params: int = 0  # trainable scalars
    trainable_share: float = 0.0  # of the parameters in the blocks
    seconds_per_step: float = 0.0  # mean wall time of a training step
    read_share: float = 0.0  # share of the training time spent reading block weights
    tokens_per_second: float = 0.0  # scored training tokens per second
    added_biases: dict[str, list[str]] = field(default_factory=dict)  # block index → linears given a new bias
    # kd / lm+kd: {"loss", "temperature", "top_k", "mass_outside_top_k": {"mean", "max"}}; None for lm
    distillation: dict | None = None


def open_model(loader: BlockLoader, spec: RetrainSpec, stream: bool, scratch: Path):
    """A ``StreamedModel`` (boundary states in the tier ``boundary_tier`` picks) or a ``ResidentModel``."""
    objective = Objective.of(spec)
    if not stream:
        return ResidentModel(loader, spec.micro_batch, objective)
    return StreamedModel(loader, spec.micro_batch, boundary_tier(spec, loader.loaded), scratch, objective)


def block_parameter_count(loaded: LoadedModel) -> int:
    """Parameters inside the blocks (from the skeleton's shapes; nothing is loaded)."""
    return sum(param.numel() for param in loaded.blocks.parameters())


class Trainer:
    """AdamW over every block's trainables, with the schedule, clipping and held-out evaluations.

    Args:
        model: a ``StreamedModel`` or ``ResidentModel``.
        trainables: the resident trainables (filled by the model's first pass).
        spec: the job.
        hooks: the caller's hooks (``step_done``).
    """

    def __init__(self, model, trainables: ModelTrainables, spec: RetrainSpec, hooks: RetrainHooks) -> None:
        self.model = model
        self.trainables = trainables
        self.spec = spec
        self.hooks = hooks
        self.optimizer: torch.optim.AdamW | None = None

    def _optimizer(self) -> torch.optim.AdamW:
        if self.optimizer is None:  # the trainables exist once every block was attached
            self.optimizer = torch.optim.AdamW(self.trainables.parameters(), lr=self.spec.lr,
                                               weight_decay=self.spec.weight_decay, foreach=False)
        return self.optimizer

    def optimizer_for_resume(self) -> torch.optim.AdamW:
        """The optimizer, created now (the trainables must exist) so a checkpoint's state can go into it."""
        return self._optimizer()

    def step(self, step: int, tokens: torch.Tensor, total_tokens: int, teacher: TeacherTopK | None = None) -> float:
        """One optimizer step (0-based ``step``) on this process's (n, T) windows; returns the mean loss.

        ``teacher``: the top-k rows of ``tokens`` (distillation).
        """
        loss_sum = self.model.loss_and_gradients(tokens, total_tokens, teacher)
        optimizer = self._optimizer()
        params = self.trainables.parameters()
        if MAX_GRAD_NORM:
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM, foreach=False)
        for group in optimizer.param_groups:
            group["lr"] = self.spec.lr * lr_factor(step, self.spec.steps, self.spec.warmup)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.hooks.step_done(step + 1)
        (loss_sum,) = distributed.all_reduce_sum(loss_sum)
        return loss_sum / total_tokens


@dataclass
class Checkpointing:
    """Where and how often the training state is saved (``checkpoint.py``)."""

    path: Path  # the checkpoint file
    every: int  # optimizer steps between checkpoints (the last step is always saved)


def _resume(trainer: Trainer, saved: dict, result: RetrainResult) -> tuple[int, dict | None]:
    """Restore a checkpoint into the trainer and ``result``; returns (next step, best state)."""
    trainer.model.materialise_trainables()
    trainer.trainables.load_state(saved["params"])
    restore_optimizer(trainer.optimizer_for_resume(), trainer.trainables, saved["adam"])
    for key, value in saved["result"].items():
        setattr(result, key, [tuple(item) for item in value] if key == "val_curve" else value)
    logger.info("retrain: resuming after step %d of %d", saved["step"], trainer.spec.steps)
    return saved["step"], saved["best"]


def train(trainer: Trainer, tokens: torch.Tensor, spec: RetrainSpec, result: RetrainResult, *,
          checkpointing: Checkpointing | None = None, saved: dict | None = None,
          teacher: TeacherTopK | None = None) -> dict | None:
    """The training loop; fills ``result``'s curves; returns the best trainables' state (None: keep the last).

    Args:
        trainer: the optimizer over the model's trainables.
        tokens: (n, T) every window (training and held out).
        spec: the job.
        result: filled in place.
        checkpointing: save the training state as it says (None: never).
        saved: a checkpoint to continue from (``checkpoint.load_checkpoint``).
        teacher: the teacher's top-k of every window (row i: window i), for a distillation loss.
    """
    split = held_out_split(tokens.shape[0], spec.val_fraction, spec.seed)
    val_tokens = tokens[split.val]  # (n_val, T)
    val_teacher = None if teacher is None else teacher.rows(split.val)
    validating = val_tokens.shape[0] > 0
    start, best_state = 0, None
    if saved is not None:
        start, best_state = _resume(trainer, saved, result)
    elif validating:
        result.val_before = result.val_best = trainer.model.loss(val_tokens, val_teacher)
        result.val_curve.append((0, result.val_before))
        result.best_step = 0
        best_state = trainer.trainables.state()
    bar = progress_bar(total=spec.steps, desc="retrain", unit="step", initial=start)
    started, train_tokens = time.perf_counter(), 0
    with bar:
        for step in range(start, spec.steps):
            rows = step_rows(split.train, spec.batch, step, spec.seed)  # (batch,) global rows
            shard = distributed.split_samples(rows.numel())
            batch = tokens[rows[shard.start : shard.stop]]  # (b_rank, T)
            batch_teacher = None if teacher is None else teacher.rows(rows[shard.start : shard.stop])
            total = scored_tokens(tokens[rows])
            result.loss_curve.append(trainer.step(step, batch, total, batch_teacher))
            train_tokens += total
            result.steps = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss_curve[-1]:.4f}",
                            tok_s=f"{train_tokens / (time.perf_counter() - started):.0f}")
            if validating and ((step + 1) % spec.eval_every == 0 or step + 1 == spec.steps):
                val = trainer.model.loss(val_tokens, val_teacher)
                result.val_curve.append((step + 1, val))
                logger.info("retrain step %d: train loss %.4f, held-out loss %.4f", step + 1, result.loss_curve[-1], val)
                if val < result.val_best:
                    result.val_best, result.best_step, best_state = val, step + 1, trainer.trainables.state()
            crash_point(f"retrain-step:{step + 1}")
            if checkpointing is not None and ((step + 1) % checkpointing.every == 0 or step + 1 == spec.steps):
                if distributed.is_main():
                    save_checkpoint(checkpointing.path, step=step + 1, trainables=trainer.trainables,
                                    optimizer=trainer.optimizer, best_state=best_state, result=result)
    elapsed = time.perf_counter() - started
    session_steps = spec.steps - start
    if session_steps:
        result.seconds_per_step = elapsed / session_steps
        result.tokens_per_second = train_tokens / max(elapsed, 1e-9)
    return best_state


def retrain_model(loaded: LoadedModel, spec: RetrainSpec, data: str, out: Path, *,
                  hooks: RetrainHooks | None = None, merge: bool = True, framing: SequenceFraming | None = None,
                  stream: bool | None = None, tokens: torch.Tensor | None = None,
                  checkpointing: Checkpointing | None = None, teacher: TeacherTopK | None = None) -> RetrainResult:
    """Retrain every block's trainables on ``spec.loss`` over ``data`` and write the model to ``out``.

    Args:
        loaded: the pruned model (``load_model``); its zero pattern is the pruning mask.
        spec: the job.
        data: any ``--calib`` source (a local file, a dataset name, ``self``).
        out: the output folder (created); rank 0 writes.
        hooks: the caller's hooks (default: none).
        merge: fold the trained parameters into the weights; False drops them (a caller that only
            wants the hooks' effect on the frozen weights, e.g. masks).
        framing: how windows start (default: as the tokenizer adds a BOS).
        stream: force streaming (True) or the resident path (False); None: ``spec.stream`` decides.
        tokens: (n, T) windows to use instead of drawing them from ``data`` (tests, callers with data).
        checkpointing: save the training state every few steps and continue from a saved one.
        teacher: the dense teacher's top-k of every window of ``tokens`` (``teacher.teacher_top_k``);
            needed, with ``tokens``, when ``spec.loss`` distils.

    Returns:
        The ``RetrainResult``; ``out`` holds a Hugging Face folder.
    """
    hooks = hooks or NoHooks()
    stream = choose_stream(spec, loaded) if stream is None else stream
    if spec.distils and (teacher is None or tokens is None):
        raise ValueError(f"--loss {spec.loss} needs the teacher's top-k of the windows (and the windows)")
    if tokens is None:
        framing = framing or loaded.framing("auto")
        tokens = distributed.from_main(lambda: retrain_windows(loaded, data, n_windows=spec.n_windows,
                                                               seq_len=spec.seq_len, seed=spec.seed, framing=framing))
    out = Path(out)
    if distributed.is_main():  # the other ranks never write --out
        out.mkdir(parents=True, exist_ok=True)
    trainables = ModelTrainables(spec, loaded.layout)
    result = RetrainResult(streamed=stream, distillation=distillation_record(spec, teacher))
    saved = distributed.from_main(lambda: load_checkpoint(checkpointing.path)) if checkpointing is not None else None
    with BlockReads(loaded, background=True) as reads:  # each block read while the one before it computes
        loader = BlockLoader(loaded, trainables, hooks, reads=reads)
        best_state = _train_session(loader, spec, stream, tokens, out, result, checkpointing, saved, teacher)
        result.trainable_params = trainables.numel()
        result.trainable_share = result.trainable_params / max(1, block_parameter_count(loaded))
        if best_state is not None:
            trainables.load_state(best_state)
            result.kept = result.best_step > 0
            if not result.kept:
                logger.warning("retraining did not lower the held-out loss (%.4f untrained); the blocks are written "
                               "unchanged", result.val_before)
        if distributed.is_main():
            added = write_model(loader, out, merge=merge, trained=result.kept, allow_dense_merge=spec.allow_dense_merge)
            result.added_biases = {str(index): sorted(names) for index, names in added.items() if names}
    logger.info("retrain: peak RSS %.0f MiB%s", peak_rss_mb(),
                "" if peak_gpu_mb(loaded.device) is None else f", peak GPU {peak_gpu_mb(loaded.device):.0f} MiB")
    return result


def distillation_record(spec: RetrainSpec, teacher: TeacherTopK | None) -> dict | None:
    """The ``distillation`` entry of the report: settings and the truncation error (None for ``lm``)."""
    if not spec.distils:
        return None
    return {"loss": spec.loss, "temperature": spec.kd_temperature, "top_k": spec.kd_top_k,
            "mass_outside_top_k": teacher.truncation_error()}


def _train_session(loader: BlockLoader, spec: RetrainSpec, stream: bool, tokens: torch.Tensor, out: Path,
                   result: RetrainResult, checkpointing: Checkpointing | None, saved: dict | None,
                   teacher: TeacherTopK | None) -> dict | None:
    """Open the model on its path, train it (``train``), close it; returns the best trainables' state.

    Sets ``result.read_share``: the share of the session's time spent waiting for block weights.
    """
    started = time.perf_counter()
    with ExitStack() as stack:
        scratch = out / STATE_DIR if distributed.is_main() else Path(stack.enter_context(distributed.scratch_dir()))
        model = open_model(loader, spec, stream, scratch)
        try:
            best_state = train(Trainer(model, loader.trainables, spec, loader.hooks), tokens, spec, result,
                               checkpointing=checkpointing, saved=saved, teacher=teacher)
        finally:
            model.close()
    result.read_share = min(1.0, loader.read_seconds / max(time.perf_counter() - started, 1e-9))
    return best_state


def write_model(loader: BlockLoader, out: Path, *, merge: bool, trained: bool,
                allow_dense_merge: bool) -> dict[int, set[str]]:
    """Every block merged and written (``output.write_block``), then the rest of the folder.

    Returns:
        Block index → linears the merge gave a new bias.
    """
    n_blocks = loader.loaded.layout.n_blocks
    added: dict[int, set[str]] = {}
    with progress_bar(desc="merging and writing" if merge else "writing", unit="block", total=n_blocks + 1) as bar:
        for index in range(n_blocks):
            added[index] = write_block(loader, index, out, merge=merge, trained=trained,
                                       allow_dense_merge=allow_dense_merge)
            bar.update()
        write_rest(loader, out, set().union(*added.values()))  # the modules outside the blocks, config, index
        bar.update()
    return added
