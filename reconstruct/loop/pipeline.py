"""The per-block pipeline: dense targets, pruner statistics, prune, reconstruct, propagate.

``BlockPipeline.process`` takes one block already loaded on the compute device and both activation
streams at its input, and leaves the streams at its output. It knows nothing about files: loading,
writing and checkpoints are ``reconstruct.jobs.run_job``'s. Each step takes the block's
:class:`~reconstruct.loop.context.BlockContext`.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from calib.activations import ActivationStream
from calib.capture import BlockArguments
from calib.hooks import group_by_shared_input, recording_linear_inputs
from pruners import get_pruner
from pruners.pattern import SparsityPattern
from pruners.schedule import cycle_pattern
from pruners.structured import ChannelGroups, HeadGroups
from reconstruct.config import JobConfig
from reconstruct.faults import crash_point
from reconstruct.loop.block_report import BlockReport
from reconstruct.loop.context import BlockContext
from reconstruct.loop.objective import UnitObjective, build_units, discover_units
from reconstruct.loop.pruning import PruningSteps
from reconstruct.loop.streams import run_stream
from reconstruct.loop.unrepaired import UnrepairedCopy
from reconstruct.methods import SampleSplit, attach_method, evaluate_error, evaluate_mse, train_reconstruction
from reconstruct.methods.bias_norm import BIAS_METHODS, add_zero_biases
from reconstruct.methods.snapshot import BlockSnapshot
from reconstruct.methods.samples import local_rows
from reconstruct.modelio.architecture import BlockLayout, weight_as_out_in
from reconstruct.modelio.block_io import keep_nonzero_when_stored, stored_sparsity
from reconstruct.parallel import distributed

logger = logging.getLogger(__name__)


def uses_unit_objective(recon) -> bool:
    """True when reconstruction matches sub-layers/linears or local targets (needs a dense block copy)."""
    return recon.granularity != "block" or recon.target != "dense"


class BlockPipeline(PruningSteps):
    """Prune and reconstruct one block at a time; knows nothing about files."""

    def __init__(self, job: JobConfig, layout: BlockLayout, arguments: BlockArguments, device: torch.device,
                 model_config=None, split: SampleSplit | None = None):
        self.job = job
        self.split = split  # held-out calibration samples (global indices); None: every sample trains
        shard = None if split is None else distributed.split_samples(split.train.numel() + split.val.numel())
        self.val_rows = None if split is None else local_rows(split.val, shard)
        # --recon-val-data: this rank's calibration rows (a prefix of its rows; the validation text's
        # rows follow). None: every row is a calibration window.
        self.calib_rows = None if split is None else split.calibration_rows(shard)
        self.layout = layout
        self.arguments = arguments  # what the model passes each block (masks, rotary tables, ...)
        self.device = device
        self.model_config = model_config  # transformers config: head geometry for --pattern heads
        prune = job.prune
        self.pruner = get_pruner(
            prune.pruner, blocksize=prune.blocksize, percdamp=prune.percdamp, loraprune_steps=prune.loraprune_steps,
            loraprune_rank=prune.loraprune_rank, loraprune_lr=prune.loraprune_lr,
        )
        self.structure: HeadGroups | ChannelGroups | None = None  # structured patterns: found on block 0
        self.linear_call_order: list[list[str]] | None = None
        self.units: list | None = None  # --granularity sublayer/linear: found on the first block that trains
        self.block_sparsities: list[float] | None = None  # --allocation: each block's sparsity (None: uniform)
        # --loraprune-objective model: block index -> {name: (out, in) bool keep mask} chosen before block 0
        self.given_masks: Callable[[int], dict[str, torch.Tensor]] | None = None
        # --model-check: keep each block's tensors that its repair changes, as they were before it
        self.keep_unrepaired = False
        self.unrepaired: dict[str, torch.Tensor] | None = None  # the last block's (local name → tensor)

    def calibration(self, stream: ActivationStream | None) -> ActivationStream | None:
        """The calibration rows of ``stream`` (all of it unless it also carries ``--recon-val-data``'s rows).

        The pruner's statistics, OWL's pass, LoRAPrune's block training and the reported block error
        see these rows alone, so the validation text never changes what is pruned or trained.
        """
        if stream is None or self.calib_rows is None:
            return stream
        return stream.rows(0, self.calib_rows.numel())

    def validation(self, stream: ActivationStream) -> ActivationStream | None:
        """The ``--recon-val-data`` rows of ``stream`` (after the calibration rows); None without them."""
        if self.calib_rows is None:
            return None
        return stream.rows(self.calib_rows.numel(), stream.n_samples)

    def advance(self, forward: Callable[[torch.Tensor], torch.Tensor], stream: ActivationStream,
                compare_with: ActivationStream | None = None) -> tuple[float, float] | None:
        """``stream ← forward(stream)`` in place; the error against ``compare_with`` (:func:`run_stream`).

        The calibration rows and the validation text's rows run as separate passes, so the
        calibration rows' micro-batches are those of a job without a validation text (the same
        bytes); the error covers the calibration rows alone. Collective in a distributed run.
        """
        calibration = self.calibration(stream)
        measured = run_stream(forward, calibration, self.job.micro_batch, destination=calibration,
                              compare_with=self.calibration(compare_with))
        validation = self.validation(stream)
        if validation is not None:
            run_stream(forward, validation, self.job.micro_batch, destination=validation)
        return measured

    @property
    def reconstructing(self) -> bool:
        """True when the job trains a reconstruction method (not ``--method none``)."""
        return self.job.recon is not None and self.job.recon.method != "none"

    def block_runner(self, index: int) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
        """``run(module, x (b, T, H)) → (b, T, H)``: a block-shaped module run with block ``index``'s arguments."""
        return lambda module, hidden: self.arguments.run(module, index, hidden)

    def forward_fn(self, block: nn.Module, index: int):
        """``x (b, T, H) → block(x) (b, T, H)`` with block ``index``'s arguments."""
        return lambda hidden: self.arguments.run(block, index, hidden)

    def call_order(self, ctx: BlockContext) -> list[list[str]]:
        """The block's linears grouped by shared input, in execution order (found once, on block 0)."""
        if self.linear_call_order is None:
            record: list = []
            with torch.no_grad(), recording_linear_inputs(ctx.linears, record):
                ctx.run(ctx.block, ctx.sparse.read(slice(0, 1)))
            self.linear_call_order = group_by_shared_input(record)
            logger.info("sub-layer order: %s", " -> ".join(", ".join(group) for group in self.linear_call_order))
        return self.linear_call_order

    def reconstruction_units(self, ctx: BlockContext) -> list:
        """``--granularity`` units (``objective.build_units``), found once, on the first block that trains."""
        if self.units is None:
            self.units = build_units(self.job.recon.granularity, self.call_order(ctx), ctx.block,
                                     ctx.run, ctx.sparse.read(slice(0, 1)))
            logger.info("reconstruction units: %s", [(unit.name, unit.entries, unit.exit) for unit in self.units])
        return self.units

    def block_pattern(self, index: int) -> SparsityPattern:
        """The pattern block ``index`` is pruned to: ``--pattern`` at the block's ``--allocation`` sparsity."""
        pattern = self.job.prune.pattern
        if self.block_sparsities is None:
            return pattern
        return replace(pattern, sparsity=self.block_sparsities[index])

    def groups(self, ctx: BlockContext) -> list[list[str]]:
        """Sub-layer groups to prune in order (one group with every linear unless --sequential)."""
        if not self.job.prune.sequential:
            return [list(ctx.linears)]
        order = self.call_order(ctx)
        seen = {name for group in order for name in group}
        missing = [name for name in ctx.linears if name not in seen]  # experts the order's one sample did not reach
        return order + [missing] if missing else order

    def process(self, index: int, block: nn.Module, sparse: ActivationStream,
                dense: ActivationStream | None, stored_dtypes: dict[str, torch.dtype] | None = None) -> BlockReport:
        """Prune and reconstruct ``block``; advance both streams past it.

        On entry ``sparse`` holds the pruned model's inputs to this block and ``dense`` the dense
        model's; on return they hold the outputs of the pruned (reconstructed) and dense block.
        ``dense`` is None when the job needs no dense stream (``JobConfig.needs_dense_stream``): then the
        block's error is not measured (``mse_before``/``mse_after`` stay None). ``stored_dtypes``
        (tensor name in the block → dtype it is written in; default: the compute dtype): kept weights
        stay non-zero in it (:func:`keep_nonzero_when_stored`) and sparsity is measured in it, so the
        report describes the bytes written.
        """
        started = time.perf_counter()
        ctx = self._open(index, block, sparse, dense)
        # --cycles K: K prune -> reconstruct steps whose patterns grow to the target (pruners.schedule);
        # each step's keep masks are nested in the previous ones. K = 1 is the plain prune, reconstruct.
        prune = self.job.prune
        ctx.pattern = self.block_pattern(index)
        ctx.report.target_sparsity = ctx.pattern.sparsity
        before = None  # --model-check: the block before its (last cycle's) repair
        for cycle in range(1, prune.cycles + 1):
            ctx.cycle = cycle
            self._prune(ctx, cycle_pattern(ctx.pattern, cycle, prune.cycles, prune.cycle_schedule))
            if self.reconstructing:
                if self.keep_unrepaired and cycle == prune.cycles:
                    before = UnrepairedCopy(ctx.block)
                self._reconstruct(ctx)
        if self.reconstructing and self.job.recon.method in BIAS_METHODS:
            # the config flag a kept repair switches on covers every block: zero biases where it was undone
            padded = add_zero_biases(ctx.linears, self.bias_linears(ctx.linears))
            ctx.report.added_biases = sorted(set(ctx.report.added_biases) | set(padded))
        if ctx.dense_copy is not None:
            self.advance(self.forward_fn(ctx.dense_copy, index), dense)
            ctx.dense_copy = ctx.objective = ctx.targets = None
        written_dtypes = self._fit_storage(ctx, stored_dtypes or {})
        self.unrepaired = None if before is None else before.changed(ctx.block, ctx.linears, ctx.keep_masks,
                                                                     written_dtypes)
        self._propagate(ctx, written_dtypes)
        ctx.report.seconds = time.perf_counter() - started
        return ctx.report

    def _open(self, index: int, block: nn.Module, sparse: ActivationStream,
              dense: ActivationStream | None) -> BlockContext:
        """The block's context, with the dense targets ready: the dense stream advanced, or a dense copy.

        Unit objectives (sub-layer/linear granularity, local targets) need the dense block's inputs
        during training, so then the dense stream advances only after the block, from a dense copy.
        """
        ctx = BlockContext(
            index=index, block=block, linears={name: block.get_submodule(name) for name in self.layout.linear_names},
            sparse=sparse, dense=dense, forward=self.forward_fn(block, index), run=self.block_runner(index),
            report=BlockReport(index=index, block_params=sum(p.numel() for p in block.parameters())),
        )
        if self.reconstructing and uses_unit_objective(self.job.recon):
            ctx.dense_copy = copy.deepcopy(block)
            whole = UnitObjective(block, ctx.dense_copy, discover_units("block", []), ctx.run, sparse, dense,
                                  "dense")  # the dense copy on the dense stream
            ctx.objective, ctx.targets = whole.forward, whole
            return ctx
        if dense is not None:
            self.advance(ctx.forward, dense)  # dense targets, in place
        ctx.objective, ctx.targets = ctx.forward, dense
        return ctx

    def _propagate(self, ctx: BlockContext, written_dtypes: dict[str, torch.dtype]) -> None:
        """``sparse ← block(sparse)``, measuring the error against the targets; record the stored sparsity."""
        report = ctx.report
        measured = self.advance(ctx.forward, ctx.sparse, compare_with=ctx.dense)
        if measured is not None:
            report.mse_after, report.target_mean_square = measured
        if report.mse_before is None:
            report.mse_before = report.mse_after
        for name, module in ctx.linears.items():
            report.sparsity[name] = stored_sparsity(weight_as_out_in(module), written_dtypes[name])

    def _fit_storage(self, ctx: BlockContext, stored_dtypes: dict[str, torch.dtype]) -> dict[str, torch.dtype]:
        """Keep every kept weight non-zero in the dtype it is written in; return linear → that dtype."""
        written: dict[str, torch.dtype] = {}
        for name, module in ctx.linears.items():
            weight = weight_as_out_in(module)  # a view: writing it writes the parameter
            written[name] = stored_dtypes.get(f"{name}.weight", weight.dtype)
            keep_mask = ctx.keep_masks.get(name)
            nudged = keep_nonzero_when_stored(weight, keep_mask, written[name]) if keep_mask is not None else 0
            if nudged:
                logger.debug("%s: %d kept weight(s) below %s's smallest subnormal kept non-zero",
                             name, nudged, written[name])
        return written

    def block_seed(self, index: int, cycle: int = 1) -> int:
        """Seed of block ``index`` (and cycle): resume needs no global RNG state."""
        return self.job.calib.seed * 100_003 + index + (cycle - 1) * 1_000_003

    def _reconstruct(self, ctx: BlockContext) -> None:
        """Train the method's parameters, merge them, and record what happened (``mse_before``: first cycle's)."""
        recon, report = self.job.recon, ctx.report
        block_seed = self.block_seed(ctx.index, ctx.cycle)
        if ctx.dense_copy is not None and report.mse_before is None:
            report.mse_before = evaluate_mse(ctx.objective, ctx.sparse, ctx.targets, self.job.micro_batch,
                                             rows=self.calib_rows)
        train_forward, targets = self._training_objective(ctx)
        validating = self.split is not None and self.split.val.numel() > 0
        snapshot = BlockSnapshot(ctx.block) if validating and recon.guard else None
        handle = attach_method(
            recon.method, ctx.block, ctx.linears, ctx.keep_masks,
            rank=recon.rank, alpha=recon.alpha, bias_linears=self.bias_linears(ctx.linears), seed=block_seed,
        )
        result = train_reconstruction(
            train_forward, handle.trainable_parameters(), ctx.sparse, targets, recon, seed=block_seed,
            eval_micro_batch=self.job.micro_batch, measure_after=False, split=self.split,
        )
        crash_point(f"reconstruction:{ctx.index}")
        merge = handle.merge(allow_dense_merge=recon.allow_dense_merge)
        kept = True
        if validating:
            val_after = evaluate_error(train_forward, ctx.sparse, targets, self.job.micro_batch, rows=self.val_rows,
                                       loss=recon.loss)
            kept = self._judge(result.val_before, val_after, snapshot, ctx.index, ctx.cycle)
            report.val_before = result.val_before if report.val_before is None else report.val_before
            report.val_after = val_after
        for param in ctx.block.parameters():
            param.requires_grad_(False)
        self._record_reconstruction(report, result, handle, merge, kept=kept, guarded=snapshot is not None)

    def _training_objective(self, ctx: BlockContext):
        """``(forward, targets)`` that training matches: the whole block's, or ``--granularity`` units'."""
        if ctx.dense_copy is None:  # PERP's objective: block(x_sparse) ≈ y_dense, the dense stream
            return ctx.objective, ctx.targets
        objective = UnitObjective(ctx.block, ctx.dense_copy, self.reconstruction_units(ctx), ctx.run,
                                  ctx.sparse, ctx.dense, self.job.recon.target)
        return objective.forward, objective

    @staticmethod
    def _record_reconstruction(report: BlockReport, result, handle, merge, *, kept: bool, guarded: bool) -> None:
        """Copy one cycle's training and merge outcome into ``report``."""
        if report.mse_before is None:
            report.mse_before = result.mse_before
        report.trainable_params = handle.num_trainable
        report.recon_steps += result.steps
        report.train_error = result.train_error
        if guarded:
            report.recon_kept = kept or bool(report.recon_kept)
            report.recon_stopped_at = result.stopped_at
        if kept:
            report.added_biases = sorted(set(report.added_biases) | handle.added_biases)
            report.densified_fraction = getattr(merge, "densified_fraction", 0.0)

    @staticmethod
    def _judge(val_before: float, val_after: float, snapshot: BlockSnapshot | None, index: int, cycle: int) -> bool:
        """Keep the merged repair only if it is better on the validation samples; else restore ``snapshot``.

        Returns:
            Whether the repair stays (always True without a snapshot, i.e. with the guard off).
        """
        better = val_after < val_before  # NaN is never better
        if snapshot is None or better:
            return True
        snapshot.restore()
        logger.info("block %d%s: repair undone, validation error %.4g → %.4g is no better than the pruned block",
                    index, f" cycle {cycle}" if cycle > 1 else "", val_before, val_after)
        return False

    def bias_linears(self, linears: dict[str, nn.Module]) -> set[str]:
        """Linears that may carry a bias in the output: those with one, and those a config flag enables."""
        enabled = {name for names in self.layout.bias_flags.values() for name in names}
        return {name for name, module in linears.items() if module.bias is not None or name in enabled}
