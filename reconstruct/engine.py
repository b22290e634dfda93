"""The streaming engine: one loop over the blocks, for every architecture.

For each block: load it from the checkpoint shards, compute the dense targets, collect pruner
statistics on the pruned stream, prune, reconstruct, propagate the pruned stream, write the block,
checkpoint the streams, free the block. See docs/architecture.md for the data flow.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from calib.activations import ActivationStream
from calib.capture import BlockKwargs, block_output, capture_block_inputs
from pruners import get_pruner
from pruners.base import BlockTraining, GivenScores
from pruners.masks import select_keep_mask
from pruners.schedule import cycle_pattern, scaled_pattern, schedule_fraction
from pruners.structured import ChannelGroups, HeadGroups, find_groups, select_structured
from reconstruct import distributed
from reconstruct.architecture import BlockLayout, weight_as_out_in
from reconstruct.atomic import atomic_write_json, save_safetensors_atomic
from reconstruct.block_io import (
    keep_nonzero_when_stored, load_module_weights, module_tensors_for_output, release_module_weights, stored_sparsity,
)
from reconstruct.config import JobConfig
from reconstruct.faults import crash_point
from reconstruct.job_state import JobState
from reconstruct.loaded_model import LoadedModel, load_model
from reconstruct.methods import SampleSplit, attach_method, evaluate_mse, split_samples, train_reconstruction
from reconstruct.methods.snapshot import BlockSnapshot
from reconstruct.methods.train import local_rows, log_training_budget
from reconstruct.objective import UnitObjective, build_units, discover_units
from reconstruct.output import INDEX_NAME, REPORT_NAME, copy_side_files, shard_name, write_config, write_index
from reconstruct.planner import MemoryBudget, check_memory_plan
from reconstruct.progress import progress_bar
from reconstruct.report import finish_report, refresh_finished_report
from reconstruct.runtime import peak_gpu_mb, peak_rss_mb, unpool_large_allocations
from reconstruct.validation import resolve_evaluation, validate_job
from reconstruct.statistics import feeding_statistics, group_by_shared_input, recording_linear_inputs

logger = logging.getLogger(__name__)


@dataclass
class BlockReport:
    """What happened to one block; stored in the manifest and in ``reconstruct.json``."""

    index: int
    sparsity: dict[str, float] = field(default_factory=dict)  # linear → fraction of zeros
    mse_before: float | None = None  # pruned block on pruned stream vs dense targets, before reconstruction
    mse_after: float | None = None  # same, after reconstruction and merge
    target_mean_square: float | None = None  # mean square of the dense targets: the scale of the MSEs
    trainable_params: int = 0
    block_params: int = 0
    recon_steps: int = 0
    added_biases: list[str] = field(default_factory=list)
    densified_fraction: float = 0.0  # lora only: share of pruned weights that became non-zero
    removed: dict[str, list[int]] = field(default_factory=dict)  # heads/channels: removed heads, kv_heads, channels
    seconds: float = 0.0
    train_error: float | None = None  # training-batch loss over the last evaluation interval (last cycle)
    val_before: float | None = None  # error on the held-out samples before reconstruction (first cycle)
    val_after: float | None = None  # the same after the merge (last cycle), whether kept or undone
    recon_kept: bool | None = None  # guard: a repair is in the written block (None: no guard)
    recon_stopped_at: int | None = None  # guard: step whose parameters were kept, last cycle (0: none)


@torch.no_grad()
def run_stream(
    forward, source: ActivationStream, micro_batch: int, destination: ActivationStream | None = None,
    compare_with: ActivationStream | None = None,
) -> tuple[float, float] | None:
    """Run ``forward`` over every micro-batch of ``source``.

    Outputs go to ``destination`` (may be ``source`` itself: samples are independent). If
    ``compare_with`` is given, returns the mean squared error of the outputs against it and the mean
    square of ``compare_with`` itself, the scale of that error (over every rank's samples in a
    distributed run: then every rank must call it).
    """
    squared_error, target_square, count = 0.0, 0.0, 0
    for start in range(0, source.n_samples, micro_batch):
        rows = slice(start, min(start + micro_batch, source.n_samples))
        output = forward(source.read(rows))  # (b, T, H)
        if compare_with is not None:
            target = compare_with.read(rows).float()  # (b, T, H)
            diff = output.float() - target
            squared_error += diff.pow(2).sum().item()
            target_square += target.pow(2).sum().item()
            count += diff.numel()
        if destination is not None:
            destination.write(rows, output)
    if compare_with is None:
        return None
    squared_error, target_square, count = distributed.all_reduce_sum(squared_error, target_square, count)
    return squared_error / count, target_square / count


def prune_layer(module: nn.Module, pruner, stats, pattern, within: torch.Tensor | None = None) -> torch.Tensor:
    """Prune one linear in place and return its keep mask, shape (out, in) (a subset of ``within``)."""
    weight = weight_as_out_in(module).detach().float().clone()  # (out, in)
    new_weight, keep_mask = pruner.prune(weight, stats, pattern, within)
    assert bool((keep_mask | (new_weight == 0)).all()), "pruner returned non-zero pruned weights"
    with torch.no_grad():
        target = weight_as_out_in(module)  # a view: writing it writes the parameter
        target.copy_(new_weight.to(target.dtype))
    return keep_mask


def uses_unit_objective(recon) -> bool:
    """True when reconstruction matches sub-layers/linears or local targets (needs a dense block copy)."""
    return recon.granularity != "block" or recon.target != "dense"


class BlockPipeline:
    """Prune and reconstruct one block at a time; knows nothing about files."""

    def __init__(self, job: JobConfig, layout: BlockLayout, kwargs: BlockKwargs, device: torch.device,
                 model_config=None, split: SampleSplit | None = None):
        self.job = job
        self.split = split  # held-out calibration samples (global indices); None: every sample trains
        self.val_rows = None if split is None else local_rows(
            split.val, distributed.split_samples(split.train.numel() + split.val.numel()))
        self.layout = layout
        self.kwargs = kwargs
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
        self.current_index = -1

    def run_block(self, module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """``module(hidden)`` for a block-shaped module, with the captured keyword arguments."""
        return block_output(module(hidden, **self.kwargs.for_batch(hidden.shape[0])))

    def forward_fn(self, block: nn.Module):
        """``x (b, T, H) → block(x) (b, T, H)``."""
        return lambda hidden: self.run_block(block, hidden)

    def call_order(self, block: nn.Module, linears: dict[str, nn.Module], sparse: ActivationStream) -> list[list[str]]:
        """The block's linears grouped by shared input, in execution order (found once, on block 0)."""
        if self.linear_call_order is None:
            record: list = []
            with torch.no_grad(), recording_linear_inputs(linears, record):
                self.run_block(block, sparse.read(slice(0, 1)))
            self.linear_call_order = group_by_shared_input(record)
            logger.info("sub-layer order: %s", self.linear_call_order)
        return self.linear_call_order

    def reconstruction_units(self, block: nn.Module, linears: dict[str, nn.Module],
                             sparse: ActivationStream) -> list:
        """``--granularity`` units (``objective.build_units``), found once, on the first block that trains."""
        if self.units is None:
            self.units = build_units(self.job.recon.granularity, self.call_order(block, linears, sparse), block,
                                     self.run_block, sparse.read(slice(0, 1)))
            logger.info("reconstruction units: %s", [(unit.name, unit.entries, unit.exit) for unit in self.units])
        return self.units

    def groups(self, block: nn.Module, linears: dict[str, nn.Module], sparse: ActivationStream) -> list[list[str]]:
        """Sub-layer groups to prune in order (one group with every linear unless --sequential)."""
        if not self.job.prune.sequential:
            return [list(linears)]
        return self.call_order(block, linears, sparse)

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
        self.current_index = index
        micro_batch = self.job.micro_batch
        forward = self.forward_fn(block)
        linears = {name: block.get_submodule(name) for name in self.layout.linear_names}
        report = BlockReport(index=index, block_params=sum(p.numel() for p in block.parameters()))
        recon = self.job.recon
        reconstructing = recon is not None and recon.method != "none"
        # Unit objectives (sub-layer/linear granularity, local targets) need the dense block's
        # inputs during training, so the dense stream advances only afterwards, with a dense copy.
        dense_copy = copy.deepcopy(block) if reconstructing and uses_unit_objective(recon) else None
        if dense_copy is None and dense is not None:
            run_stream(forward, dense, micro_batch, destination=dense)  # dense targets, in place

        # --cycles K: K prune -> reconstruct steps whose patterns grow to the target (pruners.schedule);
        # each step's keep masks are nested in the previous ones. K = 1 is the plain prune, reconstruct.
        keep_masks: dict[str, torch.Tensor] = {}
        prune = self.job.prune
        for cycle in range(1, prune.cycles + 1):
            pattern = cycle_pattern(prune.pattern, cycle, prune.cycles, prune.cycle_schedule)
            self._prune(block, linears, keep_masks, pattern, sparse, dense, dense_copy, cycle, report)
            if reconstructing:
                self._reconstruct(block, linears, keep_masks, sparse, dense, dense_copy, index, report, cycle)
        if dense_copy is not None:
            run_stream(self.forward_fn(dense_copy), dense, micro_batch, destination=dense)
            del dense_copy
        written_dtypes = self._fit_storage(linears, keep_masks, stored_dtypes or {})

        measured = run_stream(forward, sparse, micro_batch, destination=sparse, compare_with=dense)
        if measured is not None:
            report.mse_after, report.target_mean_square = measured
        if report.mse_before is None:
            report.mse_before = report.mse_after
        for name, module in linears.items():
            report.sparsity[name] = stored_sparsity(weight_as_out_in(module), written_dtypes[name])
        report.seconds = time.perf_counter() - started
        return report

    def _fit_storage(self, linears: dict[str, nn.Module], keep_masks: dict[str, torch.Tensor],
                     stored_dtypes: dict[str, torch.dtype]) -> dict[str, torch.dtype]:
        """Keep every kept weight non-zero in the dtype it is written in; return linear → that dtype."""
        written: dict[str, torch.dtype] = {}
        for name, module in linears.items():
            weight = weight_as_out_in(module)  # a view: writing it writes the parameter
            written[name] = stored_dtypes.get(f"{name}.weight", weight.dtype)
            nudged = keep_nonzero_when_stored(weight, keep_masks[name], written[name]) if name in keep_masks else 0
            if nudged:
                logger.debug("%s: %d kept weight(s) below %s's smallest subnormal kept non-zero",
                             name, nudged, written[name])
        return written

    def _prune(self, block, linears, keep_masks, pattern, sparse, dense, dense_copy, cycle, report) -> None:
        """Prune ``block`` to ``pattern``, nested in ``keep_masks`` (earlier cycles), which it updates."""
        if pattern.structured:
            self._prune_structured(block, linears, keep_masks, pattern, sparse, dense, dense_copy, cycle, report)
            return
        for group in self.groups(block, linears, sparse):
            members = {name: linears[name] for name in group}
            stats = self._pruner_inputs(block, members, keep_masks, sparse, dense, dense_copy, cycle)
            for name in group:
                keep_masks[name] = prune_layer(linears[name], self.pruner, stats.get(name), pattern, keep_masks.get(name))
            del stats

    def _prune_structured(self, block, linears, keep_masks, pattern, sparse, dense, dense_copy, cycle, report) -> None:
        """Remove whole heads or channels (pruners.structured); the other linears stay dense."""
        if self.structure is None:
            shapes = {name: tuple(weight_as_out_in(module).shape) for name, module in linears.items()}
            self.structure = find_groups(pattern, self.call_order(block, linears, sparse), shapes, self.model_config)
            logger.info("--pattern %s prunes %s", pattern.kind, self.structure)
        members = {name: linears[name] for name in self.structure.linears}
        stats = self._pruner_inputs(block, members, keep_masks, sparse, dense, dense_copy, cycle)
        importance = {
            name: self.pruner.importance(weight_as_out_in(module).detach().float(), stats.get(name))
            for name, module in members.items()
        }
        del stats
        previous = {name: keep_masks[name] for name in members if name in keep_masks}
        masks, report.removed = select_structured(pattern, self.structure, importance, previous or None)
        with torch.no_grad():
            for name, keep_mask in masks.items():
                weight = weight_as_out_in(linears[name])  # a view: writing it writes the parameter
                weight.masked_fill_(~keep_mask.to(weight.device), 0.0)
                keep_masks[name] = keep_mask
        for name, module in linears.items():  # untouched linears: everything kept
            keep_masks.setdefault(name, self._keep_all(module))

    def _pruner_inputs(self, block, group: dict[str, nn.Module], keep_masks, sparse, dense, dense_copy, cycle) -> dict:
        """What the pruner needs for ``group``: hook statistics, or scores from block training (LoRAPrune)."""
        if not self.pruner.needs_block_training:
            return self._collect_statistics(self.forward_fn(block), group, sparse)
        if dense_copy is None:  # the dense stream already holds this block's targets
            forward, targets = self.forward_fn(block), dense
        else:
            whole = self._whole_block_objective(block, dense_copy, sparse, dense)
            forward, targets = whole.forward, whole
        current = {name: keep_masks[name] if name in keep_masks else self._keep_all(module) for name, module in group.items()}
        prune = self.job.prune  # provisional masks ramp from the previous cycle's sparsity to this one's
        start = schedule_fraction(cycle - 1, prune.cycles, prune.cycle_schedule) if cycle > 1 else 0.0
        end = schedule_fraction(cycle, prune.cycles, prune.cycle_schedule)
        training = BlockTraining(
            block=block, linears=group, keep_masks=current, forward=forward, inputs=sparse, targets=targets,
            seed=self.block_seed(self.current_index, cycle), micro_batch=self.job.micro_batch,
            select_masks=lambda scores, fraction, within: self._select_masks(
                scores, scaled_pattern(self.job.prune.pattern, start + fraction * (end - start)), within),
        )
        scores = self.pruner.score_block(training)
        crash_point(f"statistics:{self.current_index}")
        return {name: GivenScores(scores[name]) for name in group}

    def _keep_all(self, module: nn.Module) -> torch.Tensor:
        """A keep mask that keeps every weight of ``module``, shape (out, in)."""
        return torch.ones(weight_as_out_in(module).shape, dtype=torch.bool, device=self.device)

    def _whole_block_objective(self, block, dense_copy, sparse, dense) -> UnitObjective:
        """The block-output objective computed with the dense copy: dense block on the dense stream."""
        return UnitObjective(block, dense_copy, discover_units("block", []), self.run_block, sparse, dense, "dense")

    def _select_masks(self, scores: dict[str, torch.Tensor], pattern, within: dict[str, torch.Tensor]) -> dict:
        """Keep masks ``pattern`` chooses from ``scores`` (per linear), nested in ``within``; changes no weight."""
        if pattern.structured:
            masks, _ = select_structured(pattern, self.structure, scores, within or None)
            return masks
        return {name: select_keep_mask(value, pattern, within.get(name)) for name, value in scores.items()}

    def block_seed(self, index: int, cycle: int = 1) -> int:
        """Seed of block ``index`` (and cycle): resume needs no global RNG state."""
        return self.job.calib.seed * 100_003 + index + (cycle - 1) * 1_000_003

    def _collect_statistics(self, forward, group: dict[str, nn.Module], sparse: ActivationStream) -> dict:
        if not self.pruner.needs_calibration:
            return {}
        stats = {
            name: self.pruner.new_stats(weight_as_out_in(module).shape[1], self.device) for name, module in group.items()
        }
        with feeding_statistics(group, stats) as cut_short:
            run_stream(cut_short(forward), sparse, self.job.micro_batch)  # outputs unused: stop once all are fed
        distributed.all_reduce_statistics(stats.values())  # every rank's tokens, before any mask is chosen
        crash_point(f"statistics:{self.current_index}")
        return stats

    def _reconstruct(self, block, linears, keep_masks, sparse, dense, dense_copy, index, report: BlockReport,
                     cycle: int = 1) -> None:
        """Train the method's parameters, merge them, and record what happened (``mse_before``: first cycle's)."""
        recon = self.job.recon
        block_seed = self.block_seed(index, cycle)
        if dense_copy is None:  # PERP's objective: block(x_sparse) ≈ y_dense, the dense stream
            train_forward, targets = self.forward_fn(block), dense
        else:
            whole = self._whole_block_objective(block, dense_copy, sparse, dense)
            if report.mse_before is None:
                report.mse_before = evaluate_mse(whole.forward, sparse, whole, self.job.micro_batch)
            objective = UnitObjective(block, dense_copy, self.reconstruction_units(block, linears, sparse),
                                      self.run_block, sparse, dense, recon.target)
            train_forward, targets = objective.forward, objective
        validating = self.split is not None and self.split.val.numel() > 0
        snapshot = BlockSnapshot(block) if validating and recon.guard else None
        handle = attach_method(
            recon.method, block, linears, keep_masks,
            rank=recon.rank, alpha=recon.alpha, bias_linears=self.bias_linears(linears), seed=block_seed,
        )
        result = train_reconstruction(
            train_forward, handle.trainable_parameters(), sparse, targets, recon, seed=block_seed,
            eval_micro_batch=self.job.micro_batch, measure_after=False, split=self.split,
        )
        crash_point(f"reconstruction:{index}")
        merge = handle.merge(allow_dense_merge=recon.allow_dense_merge)
        kept = True
        if validating:
            val_after = evaluate_mse(train_forward, sparse, targets, self.job.micro_batch, rows=self.val_rows)
            kept = self._judge(result.val_before, val_after, snapshot, index, cycle)
            report.val_before = result.val_before if report.val_before is None else report.val_before
            report.val_after = val_after
        for param in block.parameters():
            param.requires_grad_(False)
        if report.mse_before is None:
            report.mse_before = result.mse_before
        report.trainable_params = handle.num_trainable
        report.recon_steps += result.steps
        report.train_error = result.train_error
        if snapshot is not None:
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


def run_job(job: JobConfig, budget: MemoryBudget | None = None) -> dict:
    """Run (or resume) a job end to end; returns the report written to ``reconstruct.json``.

    First the memory plan (``reconstruct.planner``) is logged; a job whose plan exceeds ``budget``
    (``--gpu-memory``/``--host-memory``, default: this machine's free memory) is refused with a
    ValueError naming the flags to change, and ``--offload auto`` becomes the tier the plan chose.
    """
    started = time.perf_counter()
    unpool_large_allocations()
    job = distributed.join(job)  # under torchrun: one rank of a data-parallel job (docs/distributed.md)

    def prepare():  # rank 0 first: it may convert a GGUF into the cache the others then read
        loaded = load_model(job.model, job.device, job.dtype)
        resolved = resolve_evaluation(job, loaded.config)  # --eval-seq-len: default and limit from the config
        validate_job(resolved, loaded)
        return loaded, check_memory_plan(resolved, loaded, budget)

    loaded, job = distributed.agree(prepare, main_first=True)  # one rank refusing stops all
    with JobState.open(job, loaded) as state:
        if state.finished and not distributed.is_main():
            return {"already_finished": True, **asdict(distributed.world())}
        if state.finished:
            logger.info("%s already holds this finished job; nothing to do", job.out)
            return {**refresh_finished_report(job, state), "already_finished": True}
        report = _run_blocks(job, loaded, state)
        report["seconds_this_session"] = time.perf_counter() - started
        return report


def _run_blocks(job: JobConfig, loaded: LoadedModel, state: JobState) -> dict:
    layout = loaded.layout
    n_shards = layout.n_blocks + 1
    if state.manifest.first_unfinished_block() == layout.n_blocks:  # killed while finishing
        logger.info("all %d blocks are done; writing the rest of the output", layout.n_blocks)
        return assemble_output(job, loaded, state, n_shards)
    tokens = state.calibration_tokens(loaded)  # (n, T), the same on every rank
    shard = distributed.split_samples(tokens.shape[0])  # this rank's contiguous rows (all, in one process)
    tokens = tokens[shard.start : shard.stop]  # (n_rank, T)
    n_samples, seq_len = tokens.shape
    hidden = loaded.hidden_size
    stream_args = dict(dtype=loaded.dtype, device=loaded.device, tier=state.offload_tier(loaded, n_samples * seq_len))
    sparse = ActivationStream(n_samples, seq_len, hidden, disk_path=state.stream_path("sparse"), **stream_args)
    dense = None
    if job.needs_dense_stream:
        dense = ActivationStream(n_samples, seq_len, hidden, disk_path=state.stream_path("dense"), **stream_args)
    else:
        logger.info("--method none: no dense stream (one block forward fewer per block); "
                    "add --track-error to report each block's error")

    kwargs = capture_kwargs_and_inputs(loaded, tokens, job.micro_batch, sparse)
    start_block = state.restore_streams(sparse, dense)
    if start_block == 0 and dense is not None:
        dense.copy_from(sparse)
    split = None
    if job.recon is not None and job.recon.method != "none":
        split = split_samples(shard.total, job.recon.val_fraction, job.calib.seed)  # the same on every rank
        log_training_budget(job.recon, split)
    pipeline = BlockPipeline(job, layout, kwargs, loaded.device, loaded.config, split=split)

    progress = progress_bar(range(start_block, layout.n_blocks), desc="blocks", unit="block", initial=start_block,
                            total=layout.n_blocks)
    for index in progress:
        block = loaded.blocks[index]
        prefix = layout.block_prefix(index)
        stored_dtypes = load_module_weights(block, prefix, loaded.reader, loaded.key_map, loaded.device, loaded.dtype)
        loaded.reader.close()  # unmap the shards: mapped pages of earlier blocks must not stay resident
        block_report = pipeline.process(index, block, sparse, dense, stored_dtypes)
        tensors = module_tensors_for_output(block, prefix, stored_dtypes)
        release_module_weights(block)
        digest = (save_safetensors_atomic(job.out / shard_name(index, n_shards), tensors, {"format": "pt"})
                  if distributed.is_main() else "")  # rank 0 alone writes
        state.block_done(index, shard_name(index, n_shards), digest, asdict(block_report), sparse, dense)
        del tensors  # else this block's tensors (its weights on CPU) stay alive through the next block's load
        logger.info(
            "block %d/%d: sparsity %.3f%s, %.1fs", index + 1, layout.n_blocks,
            sum(block_report.sparsity.values()) / max(len(block_report.sparsity), 1),
            ("" if block_report.mse_after is None else
             f", mse {block_report.mse_before or 0.0:.3g} → {block_report.mse_after:.3g}") + describe_guard(block_report),
            block_report.seconds,
        )
    return assemble_output(job, loaded, state, n_shards)


def describe_guard(report: BlockReport) -> str:
    """``, validation a → b (kept at step s)`` for the block log line; empty without validation."""
    if report.val_before is None or report.val_after is None:
        return ""
    if report.recon_kept is None:
        verdict = "guard off"
    elif report.recon_kept:
        verdict = f"kept, step {report.recon_stopped_at}"
    else:
        verdict = "undone"
    return f", validation {report.val_before:.3g} → {report.val_after:.3g} ({verdict})"


def capture_kwargs_and_inputs(loaded: LoadedModel, tokens: torch.Tensor, micro_batch: int,
                              sparse: ActivationStream) -> BlockKwargs:
    """Materialise the modules outside the blocks, capture block-0 inputs into ``sparse``, free them."""
    outside = loaded.load_outside_blocks()
    try:
        by_size = capture_block_inputs(loaded.model, loaded.blocks[0], tokens, micro_batch, sparse.write, loaded.device)
        single = capture_block_inputs(loaded.model, loaded.blocks[0], tokens[:1], 1, lambda rows, x: None, loaded.device)
    finally:
        for module in outside:
            release_module_weights(module)
    by_size.update(single)
    return BlockKwargs(by_size)


def assemble_output(job: JobConfig, loaded: LoadedModel, state: JobState, n_shards: int) -> dict:
    """Write the tensors outside the blocks, config, tokenizer, index and report; mark the job finished.

    Rank 0's work alone in a distributed run; the other ranks return ``{"rank", "size"}``.
    """
    if not distributed.is_main():
        return asdict(distributed.world())
    out = job.out
    rest_name = shard_name(n_shards - 1, n_shards)
    rest = loaded.read_outside_block_tensors()
    save_safetensors_atomic(out / rest_name, rest, {"format": "pt"})
    weight_map = dict(state.block_weight_map())
    weight_map.update({name: rest_name for name in rest})
    total_bytes = state.block_bytes() + sum(t.numel() * t.element_size() for t in rest.values())
    copy_side_files(loaded.folder, out)
    write_config(loaded.folder, out, state.bias_flags_to_enable(loaded.layout))
    write_index(out, weight_map, total_bytes)
    report = state.final_report(peak_rss_mb=peak_rss_mb(), peak_gpu_mb=peak_gpu_mb(loaded.device))
    report["world_size"] = distributed.world().size  # processes that shared the calibration samples
    report["framing"] = {"calib_bos": job.calib.bos, **loaded.framing(job.calib.bos).record()}  # how windows started
    report = finish_report(job, report)  # --eval, then report.md / report.png
    atomic_write_json(out / REPORT_NAME, report)
    state.finish([rest_name, INDEX_NAME, "config.json", REPORT_NAME])
    return report
