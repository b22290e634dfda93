"""The reconstruction loop: fit a block's trainable parameters so its outputs match the dense block's.

PERP's layer-wise reconstruction: minimise ``MSE(block_pruned(x_sparse), y_dense)`` (or the
token-relative error, ``ReconSpec.loss``) with AdamW and a linearly decaying learning rate, on the
calibration activations of one block.

With a :class:`SampleSplit` that holds out validation samples, training draws only from the training
samples, and the guard (``ReconSpec.guard``) evaluates the error on the held-out ones every
``eval_every`` steps, stops after ``patience`` evaluations without improvement, and leaves the
parameters of the best evaluation (the untrained ones if none improved).

Distributed (``reconstruct.parallel.distributed``): the streams hold this rank's contiguous rows of the
global sample axis, ranks in order. Every rank draws the same global batch from the same generator
and computes the part it holds (possibly none: it still joins the all-reduce); the loss is divided by
the global batch size and the gradients are summed over ranks before each step, so the result equals
one process's up to float summation order. Validation errors are summed over ranks, so every rank
takes the same early-stopping decision. Every rank must train (it is collective); ranks end with rank
0's parameter values.

Which samples train and in what order: ``samples.py``; the block error: ``evaluate.py``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from reconstruct.methods.evaluate import ActivationStream, block_output, evaluate_error, evaluate_mse
from reconstruct.methods.loss import error_terms
from reconstruct.methods.samples import (  # noqa: F401  (log_training_budget: imported from here by the job)
    SampleOrder,
    SampleSplit,
    local_micro_batches,
    local_rows,
    log_training_budget,
)
from reconstruct.methods.spec import ReconSpec
from reconstruct.parallel import distributed

logger = logging.getLogger(__name__)


@dataclass
class ReconResult:
    """Outcome of reconstructing one block."""

    mse_before: float  # mean squared error over all samples before training (float32)
    mse_after: float  # the same after training, before merging (merging does not change outputs)
    steps: int  # optimizer steps taken
    seconds: float  # wall time, both evaluations included
    val_before: float | None = None  # error on the validation samples before training (None: no split)
    val_best: float | None = None  # validation error of the parameters left in place (guard on)
    stopped_at: int | None = None  # step whose parameters were kept (0: none improved; None: no guard)
    train_error: float | None = None  # mean training-batch loss over the last evaluation interval
    val_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, validation error), guard on


def _trainable_input(x: Tensor) -> Tensor:
    """Activations captured under ``torch.inference_mode`` cannot be saved for backward: copy them."""
    return x.clone() if x.is_inference() else x


@dataclass
class Objective:
    """What one block's training matches, and how its error is measured.

    ``forward`` runs the block (with its adapters) on (b, T, H); ``inputs`` feed it, ``targets`` are
    what it should output; the block error covers the ``measured`` rows of this rank (None: all), the
    guard judges the ``validation`` rows.
    """

    forward: Callable[[Tensor], Tensor]
    inputs: ActivationStream
    targets: ActivationStream
    eval_micro_batch: int
    measured: Tensor | None
    validation: Tensor
    loss: str

    def error(self) -> float:
        """The block MSE over the measured rows."""
        return evaluate_mse(self.forward, self.inputs, self.targets, self.eval_micro_batch, rows=self.measured)

    def validate(self) -> float:
        """The training loss over the validation rows (the guard's judgement)."""
        return evaluate_error(self.forward, self.inputs, self.targets, self.eval_micro_batch, rows=self.validation,
                              loss=self.loss)

    def micro_step(self, part: Tensor, batch: int) -> Tensor:
        """Forward and backward of one micro-batch; its loss (a share of the batch mean), detached."""
        out = block_output(self.forward(_trainable_input(self.inputs.read(part)))).float()
        terms = error_terms(out, self.targets.read(part).float(), self.loss)  # (b, T, H) or (b, T)
        # sum / (terms of the whole batch): the accumulated gradient is the batch mean's
        loss = torch.sum(terms) / (terms[0].numel() * batch)
        loss.backward()
        return loss.detach()


class BestParameters:
    """Early stopping: remembers the parameters of the best validation evaluation."""

    def __init__(self, params: list[nn.Parameter], val_before: float, patience: int) -> None:
        self.params = params
        self.patience = patience
        self.best = val_before  # the untrained parameters are evaluation 0
        self.best_step = 0
        self.saved = [p.detach().clone() for p in params]
        self.misses = 0

    def observe(self, step: int, val: float) -> bool:
        """Record the evaluation after ``step``; True when training should stop."""
        if val < self.best:  # NaN never improves
            self.best, self.best_step, self.misses = val, step, 0
            self.saved = [p.detach().clone() for p in self.params]
            return False
        self.misses += 1
        return self.misses >= self.patience

    @torch.no_grad()
    def restore(self) -> None:
        """Put the best evaluation's values back into the parameters."""
        for param, saved in zip(self.params, self.saved):
            param.copy_(saved)


@dataclass
class _Progress:
    """What the step loop leaves behind."""

    taken: int = 0  # optimizer steps taken
    train_error: float | None = None  # mean training loss over the last evaluation interval
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, validation error), guard on
    first_bad_step: int = -1  # step of the first non-finite loss (-1: none)


class _Steps:
    """AdamW with a linear decay to 0 over ``total_steps``, drawing each step's batch from ``order``."""

    def __init__(self, params: list[nn.Parameter], spec: ReconSpec, total_steps: int, order: SampleOrder,
                 batch: int, shard: distributed.Shard, on_gradients: Callable[[int], None] | None) -> None:
        self.params, self.spec, self.order, self.batch, self.shard = params, spec, order, batch, shard
        self.on_gradients = on_gradients
        self.optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0 - step / total_steps)

    def step(self, step: int, objective: Objective) -> Tensor:
        """One optimizer step (0-based ``step``); returns the batch's mean loss (a float32 scalar on the device)."""
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), dtype=torch.float32, device=self.params[0].device)
        for part in local_micro_batches(self.order.take(self.batch), self.shard, self.spec.micro_batch):
            step_loss += objective.micro_step(part, self.batch)
        distributed.all_reduce_grads_(self.params)  # summed: each rank's loss is already over the global batch
        if self.on_gradients is not None:
            self.on_gradients(step)
        self.optimizer.step()
        self.schedule.step()
        return step_loss


def _run_steps(steps: _Steps, objective: Objective, total_steps: int, best: BestParameters | None,
               progress: bool) -> _Progress:
    """The step loop: the training loss per evaluation interval, the guard's evaluations and early stop."""
    spec, device = steps.spec, steps.params[0].device
    result = _Progress()
    indices = range(total_steps)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="reconstruct", leave=False)
    # Step of the first non-finite loss, kept on the device: reading it back every micro-step would
    # synchronise the GPU once per micro-step just to warn once.
    first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)
    interval_loss = torch.zeros((), dtype=torch.float64, device=device)  # since the last evaluation
    interval_steps = 0
    with torch.enable_grad():
        for step in indices:
            step_loss = steps.step(step, objective)
            result.taken = step + 1
            bad = (first_bad_step < 0) & ~torch.isfinite(step_loss)
            first_bad_step = torch.where(bad, torch.full_like(first_bad_step, step), first_bad_step)
            interval_loss += step_loss
            interval_steps += 1
            if result.taken % spec.eval_every == 0 or result.taken == total_steps:
                result.train_error = distributed.all_reduce_sum(float(interval_loss) / interval_steps)[0]
                interval_loss.zero_()
                interval_steps = 0
                if best is not None:
                    result.curve.append((result.taken, objective.validate()))
                    if best.observe(result.taken, result.curve[-1][1]):
                        break
    result.first_bad_step = int(first_bad_step)
    return result


def train_reconstruction(forward: Callable[[Tensor], Tensor], params: list[nn.Parameter], inputs: ActivationStream,
                         targets: ActivationStream, spec: ReconSpec, seed: int, progress: bool = False,
                         eval_micro_batch: int | None = None, measure_after: bool = True, measure_before: bool = True,
                         on_gradients: Callable[[int], None] | None = None,
                         split: SampleSplit | None = None) -> ReconResult:
    """Train ``params`` so that ``forward(inputs)`` matches ``targets`` (PERP's reconstruction).

    AdamW(lr, weight_decay), the learning rate decayed linearly to 0 over ``spec.steps_for(n_train)``
    steps, each drawing ``spec.batch_size`` training samples (clamped to n_train; ``SampleOrder``,
    seeded with ``seed``) and accumulating the float32 loss's gradient (``spec.loss``) over slices of
    ``spec.micro_batch``. Same seed and inputs give bit-identical parameters on the CPU. The block should
    be in ``eval()`` mode; not under ``torch.inference_mode`` (inference-tensor inputs are copied per
    micro-batch, but tensors captured inside ``forward`` must be ordinary tensors).

    With validation samples in ``split``, ``val_before`` is measured on them; with ``spec.guard`` also
    every ``spec.eval_every`` steps and at the last step (the module docstring). Collective.

    Args:
        forward: runs the block (with its adapters) on (b, T, H) and returns (b, T, H).
        params: the trainable parameters (``MethodHandle.trainable_parameters()``).
        inputs: the pruned model's activation stream into this block.
        targets: the dense block's outputs.
        spec: steps (or epochs), lr, weight_decay, batch_size, micro_batch, guard settings.
        seed: seeds the sample order.
        progress: show a tqdm bar over the steps.
        eval_micro_batch: samples per forward when measuring the MSE (default: ``spec.micro_batch``).
        measure_after: measure the MSE after training (False: ``mse_after`` is NaN, for callers that
            measure it while propagating the stream).
        measure_before: measure the MSE before training (False: ``mse_before`` is NaN).
        on_gradients: ``on_gradients(step)`` once per step, once the step's gradients are summed over
            ranks, before the optimizer uses them (LoRAPrune reads the adapters' gradients).
        split: global sample indices to train on and to validate on (default: train on all).

    Returns:
        ReconResult with the MSE before and after (``steps == 0`` or no params: no training).
    """
    started = time.perf_counter()
    shard = distributed.local_shard(inputs.n_samples)  # this rank's rows of the global sample axis
    split = split if split is not None else SampleSplit.everything(shard.total)
    objective = Objective(forward, inputs, targets, eval_micro_batch or spec.micro_batch,
                          split.calibration_rows(shard),  # the block error covers calibration rows only
                          local_rows(split.val, shard), spec.loss)
    mse_before = objective.error() if measure_before else math.nan
    params = [p for p in params if p.requires_grad]
    val_before = objective.validate() if split.val.numel() else None
    n_train = split.train.numel()
    total_steps = spec.steps_for(n_train)
    if total_steps == 0 or not params or n_train == 0:
        return ReconResult(mse_before, mse_before, 0, time.perf_counter() - started, val_before, val_before)
    order = SampleOrder(split.train, seed)  # global indices: the same draw on every rank
    steps = _Steps(params, spec, total_steps, order, min(spec.batch_size, n_train), shard, on_gradients)
    best = BestParameters(params, val_before, spec.patience) if spec.guard and val_before is not None else None
    done = _run_steps(steps, objective, total_steps, best, progress)
    _leave_best(done, steps, best)
    mse_after = objective.error() if measure_after else math.nan
    return ReconResult(
        mse_before, mse_after, done.taken, time.perf_counter() - started, val_before,
        val_best=best.best if best is not None else None, stopped_at=best.best_step if best is not None else None,
        train_error=done.train_error, val_curve=done.curve,
    )


def _leave_best(done: _Progress, steps: _Steps, best: BestParameters | None) -> None:
    """After the loop: warn of a non-finite loss, drop the gradients, put the best evaluation's values
    back (guard on) and give every rank rank 0's bytes."""
    if done.first_bad_step >= 0:
        logger.warning("reconstruction loss became non-finite at step %d%s", done.first_bad_step,
                       "" if best is not None else "; the merge will refuse")
    steps.optimizer.zero_grad(set_to_none=True)
    if best is not None:
        best.restore()
    distributed.broadcast_from_main_(steps.params)  # ranks continue from identical bytes


def block_trainer(forward: Callable[[Tensor], Tensor], inputs: ActivationStream, targets: ActivationStream,
                  seed: int, eval_micro_batch: int, samples: Tensor | None = None) -> Callable[..., None]:
    """``train(params, *, steps, lr, batch_size, on_gradients)`` on one block's objective, for a pruner.

    What ``pruners.base.BlockTraining.train`` holds: :func:`train_reconstruction` of ``params`` (one
    sample per forward, no measurements), so a block-training pruner (LoRAPrune) trains exactly as
    reconstruction does without importing it. ``samples``: the global indices that train, (n,) int64
    (default: every sample; the engine leaves out ``--recon-val-data``'s rows).
    """
    split = None if samples is None else SampleSplit(samples, torch.empty(0, dtype=torch.long))

    def train(params: list[nn.Parameter], *, steps: int, lr: float, batch_size: int,
              on_gradients: Callable[[int], None] | None = None) -> None:
        # the block MSE, as LoRAPrune's block objective was measured (docs/benchmarks.md, issue 15)
        spec = ReconSpec(steps=steps, lr=lr, batch_size=batch_size, micro_batch=1, loss="mse")
        train_reconstruction(forward, params, inputs, targets, spec, seed=seed, eval_micro_batch=eval_micro_batch,
                             measure_before=False, measure_after=False, on_gradients=on_gradients, split=split)

    return train
