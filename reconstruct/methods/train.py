"""The reconstruction loop: fit a block's trainable parameters so its outputs match the dense block's.

PERP's layer-wise reconstruction: minimise ``MSE(block_pruned(x_sparse), y_dense)`` with AdamW and a
linearly decaying learning rate, on the calibration activations of one block.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from reconstruct import distributed
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


def _output(out: Tensor | tuple) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _trainable_input(x: Tensor) -> Tensor:
    """Activations captured under ``torch.inference_mode`` cannot be saved for backward: copy them."""
    return x.clone() if x.is_inference() else x


@torch.no_grad()
def evaluate_mse(
    forward: Callable[[Tensor], Tensor], inputs: ActivationStream, targets: ActivationStream, micro_batch: int
) -> float:
    """Mean squared error between ``forward(inputs)`` and ``targets`` over all samples, in float32.

    Args:
        forward: runs the block on (b, T, H) and returns (b, T, H).
        inputs: the block's input stream.
        targets: the stream to match (same n_samples).
        micro_batch: samples per forward.

    Returns:
        The mean over every element of every sample (of every rank's samples in a distributed run).
    """
    n = inputs.n_samples
    if targets.n_samples != n:
        raise ValueError(f"inputs have {n} samples but targets have {targets.n_samples}")
    total, count = 0.0, 0
    for start in range(0, n, micro_batch):
        part = slice(start, min(start + micro_batch, n))
        out = _output(forward(inputs.read(part))).float()
        target = targets.read(part).float()
        total += float(torch.sum((out - target) ** 2, dtype=torch.float64))
        count += out.numel()
    total, count = distributed.all_reduce_sum(total, count)
    return total / max(count, 1)


class _SampleOrder:
    """Batches of sample indices: each epoch is a fresh permutation drawn from a seeded CPU generator."""

    def __init__(self, n_samples: int, seed: int) -> None:
        self.n = n_samples
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.pending = torch.empty(0, dtype=torch.long)

    def take(self, batch: int) -> Tensor:
        while self.pending.numel() < batch:
            self.pending = torch.cat([self.pending, torch.randperm(self.n, generator=self.generator)])
        chosen, self.pending = self.pending[:batch], self.pending[batch:]
        return torch.sort(chosen).values  # sorted: sequential reads from a disk-backed cache


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
    local = indices[(indices >= shard.start) & (indices < shard.stop)] - shard.start  # (b_local,)
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
) -> ReconResult:
    """Train ``params`` so that ``forward(inputs)`` matches ``targets`` (PERP's reconstruction).

    AdamW(lr, weight_decay) with the learning rate decayed linearly to 0 over ``spec.steps``. Every
    step draws ``spec.batch_size`` samples (clamped to n_samples) without replacement within an
    epoch, from a CPU generator seeded with ``seed``, and accumulates the gradient of the float32 MSE
    over slices of ``spec.micro_batch`` samples. Same seed and inputs give bit-identical parameters on
    the CPU (on a GPU, up to the determinism of its kernels). The block should be in ``eval()`` mode
    so dropout is off. Do not call it under ``torch.inference_mode`` (``no_grad`` is fine: training
    re-enables gradients); input activations that are inference tensors are copied per micro-batch,
    but tensors captured inside ``forward`` (e.g. position embeddings) must be ordinary tensors.

    Distributed (``reconstruct.distributed``): ``inputs``/``targets`` hold this rank's contiguous
    rows of the global sample axis, ranks in order. Every rank draws the same global batch from the
    same generator and computes the part it holds; the loss is divided by the global batch size and
    the gradients are summed over ranks before each step, so the result equals one process's up to
    float summation order. Every rank must call this (it is collective); ranks end with rank 0's
    parameter values.

    Args:
        forward: runs the block (with its adapters) on (b, T, H) and returns (b, T, H).
        params: the trainable parameters (``MethodHandle.trainable_parameters()``).
        inputs: the pruned model's activation stream into this block.
        targets: the dense block's outputs.
        spec: steps, lr, weight_decay, batch_size, micro_batch.
        seed: seeds the sample order.
        progress: show a tqdm bar over the steps.
        eval_micro_batch: samples per forward when measuring the MSE (default: ``spec.micro_batch``).
        measure_after: measure the MSE after training; callers that measure it anyway while
            propagating the stream pass False (``mse_after`` is then NaN).
        measure_before: measure the MSE before training (False: ``mse_before`` is NaN).
        on_gradients: called as ``on_gradients(step)`` once per step, after the step's gradients are
            accumulated (and summed over ranks) and before the optimizer uses them (LoRAPrune reads
            the adapters' gradients here).

    Returns:
        ReconResult with the MSE before and after; ``steps == 0`` or no params: no training.
    """
    started = time.perf_counter()
    eval_micro_batch = eval_micro_batch or spec.micro_batch
    mse_before = evaluate_mse(forward, inputs, targets, eval_micro_batch) if measure_before else math.nan
    params = [p for p in params if p.requires_grad]
    shard = distributed.local_shard(inputs.n_samples)  # this rank's rows of the global sample axis
    if spec.steps == 0 or not params or shard.total == 0:
        return ReconResult(mse_before, mse_before, 0, time.perf_counter() - started)

    batch = min(spec.batch_size, shard.total)
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / spec.steps)
    order = _SampleOrder(shard.total, seed)  # global indices: the same draw on every rank
    steps = range(spec.steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="reconstruct", leave=False)
    # Step of the first non-finite loss, kept on the device: reading it back every micro-step would
    # synchronise the GPU once per micro-step just to warn once.
    first_bad_step = torch.full((), -1, dtype=torch.int64, device=params[0].device)
    with torch.enable_grad():
        for step in steps:
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), dtype=torch.float32, device=params[0].device)
            for part in local_micro_batches(order.take(batch), shard, spec.micro_batch):
                out = _output(forward(_trainable_input(inputs.read(part)))).float()
                target = targets.read(part).float()
                # sum / (elements of the whole batch): the accumulated gradient is the batch mean's
                loss = torch.sum((out - target) ** 2) / (target[0].numel() * batch)
                loss.backward()
                step_loss += loss.detach()
            distributed.all_reduce_grads_(params)  # summed: each rank's loss is already over the global batch
            if on_gradients is not None:
                on_gradients(step)
            optimizer.step()
            schedule.step()
            bad = (first_bad_step < 0) & ~torch.isfinite(step_loss)
            first_bad_step = torch.where(bad, torch.full_like(first_bad_step, step), first_bad_step)
    if int(first_bad_step) >= 0:
        logger.warning("reconstruction loss became non-finite at step %d; the merge will refuse", int(first_bad_step))
    optimizer.zero_grad(set_to_none=True)
    distributed.broadcast_from_main_(params)  # ranks continue from identical bytes
    mse_after = evaluate_mse(forward, inputs, targets, eval_micro_batch) if measure_after else math.nan
    return ReconResult(mse_before, mse_after, spec.steps, time.perf_counter() - started)
