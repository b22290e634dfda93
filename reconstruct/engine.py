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
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from calib.activations import ActivationStream
from calib.capture import BlockKwargs, block_output, capture_block_inputs
from pruners import get_pruner
from reconstruct.architecture import BlockLayout, weight_as_out_in
from reconstruct.atomic import atomic_write_json, save_safetensors_atomic
from reconstruct.block_io import load_module_weights, module_tensors_for_output, release_module_weights
from reconstruct.config import JobConfig
from reconstruct.faults import crash_point
from reconstruct.job_state import JobState
from reconstruct.loaded_model import LoadedModel, load_model
from reconstruct.methods import attach_method, evaluate_mse, train_reconstruction
from reconstruct.objective import UnitObjective, discover_units
from reconstruct.output import INDEX_NAME, REPORT_NAME, copy_side_files, shard_name, write_config, write_index
from reconstruct.planner import MemoryBudget, check_memory_plan
from reconstruct.report import finish_report, refresh_finished_report
from reconstruct.runtime import peak_gpu_mb, peak_rss_mb
from reconstruct.validation import validate_job
from reconstruct.statistics import feeding_statistics, group_by_shared_input, recording_linear_inputs

logger = logging.getLogger(__name__)


@dataclass
class BlockReport:
    """What happened to one block; stored in the manifest and in ``reconstruct.json``."""

    index: int
    sparsity: dict[str, float] = field(default_factory=dict)  # linear → fraction of zeros
    mse_before: float | None = None  # pruned block on pruned stream vs dense targets, before reconstruction
    mse_after: float | None = None  # same, after reconstruction and merge
    trainable_params: int = 0
    block_params: int = 0
    recon_steps: int = 0
    added_biases: list[str] = field(default_factory=list)
    densified_fraction: float = 0.0  # lora only: share of pruned weights that became non-zero
    seconds: float = 0.0


@torch.no_grad()
def run_stream(
    forward, source: ActivationStream, micro_batch: int, destination: ActivationStream | None = None,
    compare_with: ActivationStream | None = None,
) -> float | None:
    """Run ``forward`` over every micro-batch of ``source``.

    Outputs go to ``destination`` (may be ``source`` itself: samples are independent). If
    ``compare_with`` is given, returns the mean squared error of the outputs against it.
    """
    squared_error, count = 0.0, 0
    for start in range(0, source.n_samples, micro_batch):
        rows = slice(start, min(start + micro_batch, source.n_samples))
        output = forward(source.read(rows))  # (b, T, H)
        if compare_with is not None:
            diff = output.float() - compare_with.read(rows).float()
            squared_error += diff.pow(2).sum().item()
            count += diff.numel()
        if destination is not None:
            destination.write(rows, output)
    return squared_error / count if compare_with is not None else None


def prune_layer(module: nn.Module, pruner, stats, pattern) -> torch.Tensor:
    """Prune one linear in place and return its keep mask, shape (out, in)."""
    weight = weight_as_out_in(module).detach().float().clone()  # (out, in)
    new_weight, keep_mask = pruner.prune(weight, stats, pattern)
    assert not new_weight[~keep_mask].any(), "pruner returned non-zero pruned weights"
    with torch.no_grad():
        target = weight_as_out_in(module)  # a view: writing it writes the parameter
        target.copy_(new_weight.to(target.dtype))
    return keep_mask


def uses_unit_objective(recon) -> bool:
    """True when reconstruction matches sub-layers/linears or local targets (needs a dense block copy)."""
    return recon.granularity != "block" or recon.target != "dense"


class BlockPipeline:
    """Prune and reconstruct one block at a time; knows nothing about files."""

    def __init__(self, job: JobConfig, layout: BlockLayout, kwargs: BlockKwargs, device: torch.device):
        self.job = job
        self.layout = layout
        self.kwargs = kwargs
        self.device = device
        prune = job.prune
        self.pruner = get_pruner(prune.pruner, blocksize=prune.blocksize, percdamp=prune.percdamp)
        self.linear_call_order: list[list[str]] | None = None
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

    def groups(self, block: nn.Module, linears: dict[str, nn.Module], sparse: ActivationStream) -> list[list[str]]:
        """Sub-layer groups to prune in order (one group with every linear unless --sequential)."""
        if not self.job.prune.sequential:
            return [list(linears)]
        return self.call_order(block, linears, sparse)

    def process(self, index: int, block: nn.Module, sparse: ActivationStream, dense: ActivationStream) -> BlockReport:
        """Prune and reconstruct ``block``; advance both streams past it.

        On entry ``sparse`` holds the pruned model's inputs to this block and ``dense`` the dense
        model's; on return they hold the outputs of the pruned (reconstructed) and dense block.
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
        if dense_copy is None:
            run_stream(forward, dense, micro_batch, destination=dense)  # dense targets, in place

        keep_masks: dict[str, torch.Tensor] = {}
        for group in self.groups(block, linears, sparse):
            stats = self._collect_statistics(forward, {name: linears[name] for name in group}, sparse)
            for name in group:
                keep_masks[name] = prune_layer(linears[name], self.pruner, stats.get(name), self.job.prune.pattern)
            del stats

        if reconstructing:
            self._reconstruct(block, linears, keep_masks, sparse, dense, dense_copy, index, report)
        if dense_copy is not None:
            run_stream(self.forward_fn(dense_copy), dense, micro_batch, destination=dense)
            del dense_copy

        report.mse_after = run_stream(forward, sparse, micro_batch, destination=sparse, compare_with=dense)
        if report.mse_before is None:
            report.mse_before = report.mse_after
        for name, module in linears.items():
            weight = weight_as_out_in(module)
            report.sparsity[name] = float((weight == 0).sum().item() / weight.numel())
        report.seconds = time.perf_counter() - started
        return report

    def _collect_statistics(self, forward, group: dict[str, nn.Module], sparse: ActivationStream) -> dict:
        if not self.pruner.needs_calibration:
            return {}
        stats = {
            name: self.pruner.new_stats(weight_as_out_in(module).shape[1], self.device) for name, module in group.items()
        }
        with feeding_statistics(group, stats):
            run_stream(forward, sparse, self.job.micro_batch)
        crash_point(f"statistics:{self.current_index}")
        return stats

    def _reconstruct(self, block, linears, keep_masks, sparse, dense, dense_copy, index, report: BlockReport) -> None:
        """Train the method's parameters, merge them, and record what happened."""
        recon = self.job.recon
        block_seed = self.job.calib.seed * 100_003 + index  # per block: resume needs no global RNG state
        if dense_copy is None:  # PERP's objective: block(x_sparse) ≈ y_dense, the dense stream
            train_forward, targets = self.forward_fn(block), dense
        else:
            whole = UnitObjective(block, dense_copy, discover_units("block", []), self.run_block, sparse, dense, "dense")
            report.mse_before = evaluate_mse(whole.forward, sparse, whole, self.job.micro_batch)
            units = discover_units(recon.granularity, self.call_order(block, linears, sparse))
            objective = UnitObjective(block, dense_copy, units, self.run_block, sparse, dense, recon.target)
            train_forward, targets = objective.forward, objective
        handle = attach_method(
            recon.method, block, linears, keep_masks,
            rank=recon.rank, alpha=recon.alpha, bias_linears=self.bias_linears(linears), seed=block_seed,
        )
        result = train_reconstruction(
            train_forward, handle.trainable_parameters(), sparse, targets, recon, seed=block_seed,
            eval_micro_batch=self.job.micro_batch, measure_after=False,
        )
        crash_point(f"reconstruction:{index}")
        merge = handle.merge(allow_dense_merge=recon.allow_dense_merge)
        for param in block.parameters():
            param.requires_grad_(False)
        if report.mse_before is None:
            report.mse_before = result.mse_before
        report.trainable_params = handle.num_trainable
        report.recon_steps = result.steps
        report.added_biases = sorted(handle.added_biases)
        report.densified_fraction = getattr(merge, "densified_fraction", 0.0)

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
    loaded = load_model(job.model, job.device, job.dtype)
    validate_job(job, loaded)
    job = check_memory_plan(job, loaded, budget)
    with JobState.open(job, loaded) as state:
        if state.finished:
            logger.info("%s already holds this finished job; nothing to do", job.out)
            return {**refresh_finished_report(job, state), "already_finished": True}
        report = _run_blocks(job, loaded, state)
        report["seconds_this_session"] = time.perf_counter() - started
        return report


def unpool_large_allocations(threshold: int = 1 << 20) -> None:
    """Serve every host allocation of ``threshold`` bytes or more with its own mmap (glibc only).

    glibc starts with a 128 KiB mmap threshold and raises it, up to 32 MiB, each time such a chunk
    is freed. After the first block is freed, every tensor below 32 MiB (weights, activations,
    statistics) comes from the heap, where blocks of ever-shifting sizes fragment it and peak RSS
    creeps up block after block (1.16 GB at 2 blocks, 2.04 GB at 16 in bench/memory.py). A fixed
    threshold (set through mallopt, which also stops the adjustment) returns each freed tensor to
    the OS at once, so host memory stays flat with depth. Elsewhere this is a no-op.
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        ctypes.CDLL(None).mallopt(-3, threshold)  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        logger.debug("mallopt unavailable; large allocations stay pooled")


def _run_blocks(job: JobConfig, loaded: LoadedModel, state: JobState) -> dict:
    layout = loaded.layout
    n_shards = layout.n_blocks + 1
    if state.manifest.first_unfinished_block() == layout.n_blocks:  # killed while finishing
        logger.info("all %d blocks are done; writing the rest of the output", layout.n_blocks)
        return assemble_output(job, loaded, state, n_shards)
    tokens = state.calibration_tokens(loaded)  # (n, T)
    n_samples, seq_len = tokens.shape
    hidden = loaded.hidden_size
    stream_args = dict(dtype=loaded.dtype, device=loaded.device, tier=state.offload_tier(loaded, n_samples * seq_len))
    sparse = ActivationStream(n_samples, seq_len, hidden, disk_path=state.stream_path("sparse"), **stream_args)
    dense = ActivationStream(n_samples, seq_len, hidden, disk_path=state.stream_path("dense"), **stream_args)

    kwargs = capture_kwargs_and_inputs(loaded, tokens, job.micro_batch, sparse)
    start_block = state.restore_streams(sparse, dense)
    if start_block == 0:
        dense.copy_from(sparse)
    pipeline = BlockPipeline(job, layout, kwargs, loaded.device)

    progress = tqdm(range(start_block, layout.n_blocks), desc="blocks", unit="block", initial=start_block,
                    total=layout.n_blocks, disable=None)
    for index in progress:
        block = loaded.blocks[index]
        prefix = layout.block_prefix(index)
        stored_dtypes = load_module_weights(block, prefix, loaded.reader, loaded.key_map, loaded.device, loaded.dtype)
        loaded.reader.close()  # unmap the shards: mapped pages of earlier blocks must not stay resident
        block_report = pipeline.process(index, block, sparse, dense)
        tensors = module_tensors_for_output(block, prefix, stored_dtypes)
        release_module_weights(block)
        digest = save_safetensors_atomic(job.out / shard_name(index, n_shards), tensors, {"format": "pt"})
        state.block_done(index, shard_name(index, n_shards), digest, asdict(block_report), sparse, dense)
        logger.info(
            "block %d/%d: sparsity %.3f, mse %.3g → %.3g, %.1fs", index + 1, layout.n_blocks,
            sum(block_report.sparsity.values()) / max(len(block_report.sparsity), 1),
            block_report.mse_before or 0.0, block_report.mse_after or 0.0, block_report.seconds,
        )
    return assemble_output(job, loaded, state, n_shards)


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
    """Write the tensors outside the blocks, config, tokenizer, index and report; mark the job finished."""
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
    report = finish_report(job, report)  # --eval, then report.md / report.png
    atomic_write_json(out / REPORT_NAME, report)
    state.finish([rest_name, INDEX_NAME, "config.json", REPORT_NAME])
    return report
