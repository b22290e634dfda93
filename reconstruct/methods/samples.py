"""Which calibration samples train a block's repair and which judge it, and in what order they are drawn.

The samples are the rows of the activation streams, the same global axis on every rank: the held-out
split (``--recon-val``, or ``--recon-val-data``'s rows after the calibration windows), each rank's
share of a step's batch, and the seeded order of the training samples, epoch by epoch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from reconstruct.methods.spec import ReconSpec
from reconstruct.parallel import distributed

logger = logging.getLogger(__name__)


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


class SampleOrder:
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
