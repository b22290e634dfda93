"""The reconstruction loop: fit a block's trainable parameters so its outputs match the dense block's.

PERP's layer-wise reconstruction: minimise ``MSE(block_pruned(x_sparse), y_dense)`` (or the
token-relative error, ``ReconSpec.loss``) with AdamW and a linearly decaying learning rate, on the
calibration activations of one block.

With a :class:`SampleSplit` that holds out validation samples, training draws only from the training
samples, and the guard (``ReconSpec.guard``) evaluates the error on the held-out ones every
``eval_every`` steps, stops after ``patience`` evaluations without improvement, and leaves the
parameters of the best evaluation (the untrained ones if none improved).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from reconstruct.parallel import distributed
from reconstruct.methods.loss import error_terms
from reconstruct.methods.spec import ReconSpec

logger = logging.getLogger(__name__)


class ActivationStream(Protocol):
    """What the engine's activation caches provide."""

    n_samples: int

    def read(self, indices: Tensor | slice) -> Tensor:  # (b, T, H) on the compute device
        ...


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


@dataclass(frozen=True)
class SampleSplit:
    """Global sample indices (sorted) that training draws from and that validate it.

    The samples are the rows of the activation streams: the calibration windows, then, with
    ``--recon-val-data``, the validation text's windows. ``calibration`` says which rows are
    calibration windows when the streams carry such validation rows: the block error before and
    after reconstruction (and the pruner's statistics) cover those rows alone.
    """

    train: Tensor  # (n_train,) int64
    val: Tensor  # (n_val,) int64; empty: no validation
    calibration: Tensor | None = None  # (n_calib,) int64: the calibration rows; None: every row is one

    @classmethod
    def everything(cls, n_samples: int) -> SampleSplit:
        """Every sample trains, none validates (what the loop did before held-out samples)."""
        return cls(torch.arange(n_samples), torch.empty(0, dtype=torch.long))

    @classmethod
    def with_validation_text(cls, n_calib: int, n_val: int) -> SampleSplit:
        """Every calibration sample trains; ``n_val`` rows of another text after them validate.

        Args:
            n_calib: calibration windows, rows ``0 .. n_calib - 1`` (all ranks together).
            n_val: windows of ``--recon-val-data``, rows ``n_calib .. n_calib + n_val - 1``.
        """
        train = torch.arange(n_calib)  # (n_calib,): the same draw as SampleSplit.everything(n_calib)
        return cls(train, torch.arange(n_calib, n_calib + n_val), calibration=train)

    @property
    def extra_rows(self) -> bool:
        """True when the validation samples are rows of another text, not held-out calibration windows."""
        return self.calibration is not None

    def calibration_rows(self, shard: distributed.Shard) -> Tensor | None:
        """This rank's rows holding calibration windows (a prefix of its rows); None: all of them."""
        return None if self.calibration is None else local_rows(self.calibration, shard)


def split_samples(n_samples: int, val_fraction: float, seed: int) -> SampleSplit:
    """Hold out ``round(val_fraction * n_samples)`` samples, at least one, at least one left to train.

    The draw comes from a CPU generator seeded with ``seed`` (the job's), so every rank and every
    resume gets the same split. ``val_fraction == 0`` or a single sample: no validation.

    Args:
        n_samples: calibration samples, all ranks together.
        val_fraction: share held out, in [0, 1).
        seed: the job seed.

    Returns:
        The split; ``val`` is empty when nothing is held out.
    """
    if val_fraction <= 0 or n_samples < 2:
        return SampleSplit.everything(n_samples)
    n_val = min(n_samples - 1, max(1, int(n_samples * val_fraction + 0.5)))
    generator = torch.Generator(device="cpu").manual_seed(seed * 1_000_033 + 7)
    order = torch.randperm(n_samples, generator=generator)
    return SampleSplit(torch.sort(order[n_val:]).values, torch.sort(order[:n_val]).values)


MANY_EPOCHS = 8.0  # a step budget above this many passes over the training samples gets a warning


def log_training_budget(spec: ReconSpec, split: SampleSplit) -> None:
    """Log the held-out split and the step budget; warn when it means many passes over few samples."""
    n_train, n_val = split.train.numel(), split.val.numel()
    if n_val == 0:
        reason = "--recon-val 0" if spec.val_fraction == 0 else f"only {n_train} calibration sample(s)"
        logger.info("no held-out validation samples (%s): every block keeps its repair unchecked", reason)
    elif split.extra_rows:
        logger.info("calibration samples: all %d train the repair; %d windows of --recon-val-data validate it "
                    "(guard %s)", n_train, n_val, "on" if spec.guard else "off: measured only")
    else:
        logger.info("calibration samples: %d train the repair, %d validate it (guard %s)", n_train, n_val,
                    "on" if spec.guard else "off: measured only")
    steps, passes = spec.steps_for(n_train), spec.passes(n_train)
    if passes > MANY_EPOCHS:
        logger.warning("%d reconstruction steps of %d samples are %.0f passes over %d training samples: "
                       "expect overfitting (give more --n-samples, fewer --recon-steps, or --recon-epochs)",
                       steps, min(spec.batch_size, n_train), passes, n_train)


def local_rows(indices: Tensor, shard: distributed.Shard) -> Tensor:
    """The rows of this rank's stream that hold the global sample ``indices`` it owns."""
    if shard.size == shard.total:
        return indices
    return indices[(indices >= shard.start) & (indices < shard.stop)] - shard.start


def _output(out: Tensor | tuple) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _trainable_input(x: Tensor) -> Tensor:
    """Activations captured under ``torch.inference_mode`` cannot be saved for backward: copy them."""
    return x.clone() if x.is_inference() else x


def sum_of_squares(values: Tensor) -> float:
    """``Σ values²`` over every element: float32 squares summed in float64.

    The one arithmetic of the block MSE: :func:`evaluate_mse` (the error before reconstruction and
    on the held-out samples) and the engine's propagation pass (the error after) both use it, so a
    report's before and after are comparable to the last bit.
    """
    return float(torch.sum(values.float() ** 2, dtype=torch.float64))


@torch.no_grad()
def evaluate_error(
    forward: Callable[[Tensor], Tensor], inputs: ActivationStream, targets: ActivationStream, micro_batch: int,
    rows: Tensor | None = None, loss: str = "mse",
) -> float:
    """Reconstruction error (``loss``, :mod:`reconstruct.methods.loss`) of ``forward(inputs)`` against ``targets``.

    Args:
        forward: runs the block on (b, T, H) and returns (b, T, H).
        inputs: the block's input stream.
        targets: the stream to match (same n_samples).
        micro_batch: samples per forward.
        rows: only these rows of this rank's streams (sorted; may be empty); None = all.
        loss: ``mse`` (the float32 squares summed in float64, as :func:`sum_of_squares`) or ``token-relative``.

    Returns:
        The mean of the loss's terms over every sample (of every rank's samples in a distributed run).
    """
    n = inputs.n_samples
    if targets.n_samples != n:
        raise ValueError(f"inputs have {n} samples but targets have {targets.n_samples}")
    total, count = 0.0, 0
    parts = ([slice(start, min(start + micro_batch, n)) for start in range(0, n, micro_batch)] if rows is None
             else list(rows.split(micro_batch)))
    for part in parts:
        if isinstance(part, Tensor) and part.numel() == 0:
            continue
        out = _output(forward(inputs.read(part))).float()
        terms = error_terms(out, targets.read(part).float(), loss)  # (b, T, H) or (b, T)
        total += float(torch.sum(terms, dtype=torch.float64))
        count += terms.numel()
    total, count = distributed.all_reduce_sum(total, count)
    return total / max(count, 1)


def evaluate_mse(
    forward: Callable[[Tensor], Tensor], inputs: ActivationStream, targets: ActivationStream, micro_batch: int,
    rows: Tensor | None = None,
) -> float:
    """Mean squared error between ``forward(inputs)`` and ``targets``: :func:`evaluate_error` with ``mse``."""
    return evaluate_error(forward, inputs, targets, micro_batch, rows=rows)


class _SampleOrder:
    """Batches of sample indices: each epoch is a fresh permutation drawn from a seeded CPU generator."""

    def __init__(self, samples: Tensor | int, seed: int) -> None:
        # (n,) the global indices to draw from; an int n means all of 0..n-1
        self.samples = torch.arange(samples) if isinstance(samples, int) else samples
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.pending = torch.empty(0, dtype=torch.long)

    def take(self, batch: int) -> Tensor:
        n = self.samples.numel()
        while self.pending.numel() < batch:
            self.pending = torch.cat([self.pending, torch.randperm(n, generator=self.generator)])
        chosen, self.pending = self.pending[:batch], self.pending[batch:]
        return torch.sort(self.samples[chosen]).values  # sorted: sequential reads from a disk-backed cache


class _BestParameters:
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


def local_micro_batches(indices: Tensor, shard: distributed.Shard, micro_batch: int) -> list[Tensor]:
    """The micro-batches of a global batch that this rank holds, as indices into its own rows.

    Args:
        indices: ``(batch,)`` sorted global sample indices of one step (the same on every rank).
        shard: this rank's rows of the global sample axis.
        micro_batch: samples per forward/backward slice.

    Returns:
        Slices of at most ``micro_batch`` local indices, in order; an empty list when the whole
        batch lies on other ranks (``Tensor.split`` would give one empty slice: a forward on zero
        samples). Such a rank still joins the step's gradient all-reduce, with no gradients.
    """
    local = local_rows(indices, shard)  # (b_local,)
    return list(local.split(micro_batch)) if local.numel() else []


def train_reconstruction(
    forward: Callable[[Tensor], Tensor],
    params: list[nn.Parameter],
    inputs: ActivationStream,
    targets: ActivationStream,
    spec: ReconSpec,
    seed: int,
    progress: bool = False,
    eval_micro_batch: int | None = None,
    measure_after: bool = True,
    measure_before: bool = True,
    on_gradients: Callable[[int], None] | None = None,
    split: SampleSplit | None = None,
) -> ReconResult:
    """Train ``params`` so that ``forward(inputs)`` matches ``targets`` (PERP's reconstruction).

    AdamW(lr, weight_decay) with the learning rate decayed linearly to 0 over the step budget
    (``spec.steps_for(n_train)``). Every step draws ``spec.batch_size`` training samples (clamped to
    n_train) without replacement within an epoch, from a CPU generator seeded with ``seed``, and
    accumulates the gradient of the float32 loss (``spec.loss``) over slices of ``spec.micro_batch`` samples. Same
    seed and inputs give bit-identical parameters on the CPU (on a GPU, up to the determinism of its
    kernels). The block should be in ``eval()`` mode so dropout is off. Do not call it under
    ``torch.inference_mode`` (``no_grad`` is fine: training re-enables gradients); input activations
    that are inference tensors are copied per micro-batch, but tensors captured inside ``forward``
    (e.g. position embeddings) must be ordinary tensors.

    With validation samples in ``split``, ``val_before`` is measured on them; with ``spec.guard`` also
    every ``spec.eval_every`` steps and at the last step, training stops after ``spec.patience``
    evaluations without improvement, and the parameters of the best evaluation are left in place
    (the initial ones when none improved: ``stopped_at == 0``).

    Distributed (``reconstruct.parallel.distributed``): ``inputs``/``targets`` hold this rank's contiguous
    rows of the global sample axis, ranks in order. Every rank draws the same global batch from the
    same generator and computes the part it holds (possibly none: it still joins the all-reduce);
    the loss is divided by the global batch size and the gradients are summed over ranks before each
    step, so the result equals one process's up to float summation order. Validation errors are
    summed over ranks, so every rank takes the same early-stopping decision. Every rank must call
    this (it is collective); ranks end with rank 0's parameter values.

    Args:
        forward: runs the block (with its adapters) on (b, T, H) and returns (b, T, H).
        params: the trainable parameters (``MethodHandle.trainable_parameters()``).
        inputs: the pruned model's activation stream into this block.
        targets: the dense block's outputs.
        spec: steps (or epochs), lr, weight_decay, batch_size, micro_batch, guard settings.
        seed: seeds the sample order.
        progress: show a tqdm bar over the steps.
        eval_micro_batch: samples per forward when measuring the MSE (default: ``spec.micro_batch``).
        measure_after: measure the MSE after training; callers that measure it anyway while
            propagating the stream pass False (``mse_after`` is then NaN).
        measure_before: measure the MSE before training (False: ``mse_before`` is NaN).
        on_gradients: called as ``on_gradients(step)`` once per step, after the step's gradients are
            accumulated (and summed over ranks) and before the optimizer uses them (LoRAPrune reads
            the adapters' gradients here).
        split: global sample indices to train on and to validate on (default: train on all).

    Returns:
        ReconResult with the MSE before and after; ``steps == 0`` or no params: no training.
    """
    started = time.perf_counter()
    eval_micro_batch = eval_micro_batch or spec.micro_batch
    shard = distributed.local_shard(inputs.n_samples)  # this rank's rows of the global sample axis
    split = split if split is not None else SampleSplit.everything(shard.total)
    measured = split.calibration_rows(shard)  # the block error covers calibration rows only

    def error() -> float:
        return evaluate_mse(forward, inputs, targets, eval_micro_batch, rows=measured)

    mse_before = error() if measure_before else math.nan
    params = [p for p in params if p.requires_grad]
    val_rows = local_rows(split.val, shard)

    def validate() -> float:
        return evaluate_error(forward, inputs, targets, eval_micro_batch, rows=val_rows, loss=spec.loss)

    val_before = validate() if split.val.numel() else None
    n_train = split.train.numel()
    total_steps = spec.steps_for(n_train)
    if total_steps == 0 or not params or n_train == 0:
        return ReconResult(mse_before, mse_before, 0, time.perf_counter() - started, val_before, val_before)

    batch = min(spec.batch_size, n_train)
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total_steps)
    order = _SampleOrder(split.train, seed)  # global indices: the same draw on every rank
    best = _BestParameters(params, val_before, spec.patience) if spec.guard and val_before is not None else None
    curve: list[tuple[int, float]] = []
    steps = range(total_steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="reconstruct", leave=False)
    # Step of the first non-finite loss, kept on the device: reading it back every micro-step would
    # synchronise the GPU once per micro-step just to warn once.
    first_bad_step = torch.full((), -1, dtype=torch.int64, device=params[0].device)
    interval_loss = torch.zeros((), dtype=torch.float64, device=params[0].device)  # since the last evaluation
    interval_steps, train_error, taken = 0, None, 0
    with torch.enable_grad():
        for step in steps:
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), dtype=torch.float32, device=params[0].device)
            for part in local_micro_batches(order.take(batch), shard, spec.micro_batch):
                out = _output(forward(_trainable_input(inputs.read(part)))).float()
                terms = error_terms(out, targets.read(part).float(), spec.loss)  # (b, T, H) or (b, T)
                # sum / (terms of the whole batch): the accumulated gradient is the batch mean's
                loss = torch.sum(terms) / (terms[0].numel() * batch)
                loss.backward()
                step_loss += loss.detach()
            distributed.all_reduce_grads_(params)  # summed: each rank's loss is already over the global batch
            if on_gradients is not None:
                on_gradients(step)
            optimizer.step()
            schedule.step()
            taken = step + 1
            bad = (first_bad_step < 0) & ~torch.isfinite(step_loss)
            first_bad_step = torch.where(bad, torch.full_like(first_bad_step, step), first_bad_step)
            interval_loss += step_loss
            interval_steps += 1
            if taken % spec.eval_every == 0 or taken == total_steps:
                train_error = distributed.all_reduce_sum(float(interval_loss) / interval_steps)[0]
                interval_loss.zero_()
                interval_steps = 0
                if best is not None:
                    curve.append((taken, validate()))
                    if best.observe(taken, curve[-1][1]):
                        break
    if int(first_bad_step) >= 0:
        logger.warning("reconstruction loss became non-finite at step %d%s", int(first_bad_step),
                       "" if best is not None else "; the merge will refuse")
    optimizer.zero_grad(set_to_none=True)
    if best is not None:
        best.restore()
    distributed.broadcast_from_main_(params)  # ranks continue from identical bytes
    mse_after = error() if measure_after else math.nan
    return ReconResult(
        mse_before, mse_after, taken, time.perf_counter() - started, val_before,
        val_best=best.best if best is not None else None, stopped_at=best.best_step if best is not None else None,
        train_error=train_error, val_curve=curve,
    )


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
