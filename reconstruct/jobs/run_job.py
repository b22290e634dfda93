"""The streaming engine: one loop over the blocks, for every architecture.

For each block: load it from the checkpoint shards, hand it to the per-block pipeline
(``reconstruct.loop.pipeline``: dense targets, pruner statistics on the pruned stream, prune,
reconstruct, propagate), write the block, checkpoint the streams, free the block. See
docs/architecture.md for the data flow.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import torch

from calib.activations import ActivationStream
from calib.capture import BlockArguments
from reconstruct.parallel import distributed
from reconstruct.atomic import atomic_write_json
from reconstruct.modelio.block_io import (install_module_tensors, module_tensors_for_output, release_module_weights,
                                          tensors_for_output)
from reconstruct.config import JobConfig
from reconstruct.evaluation.parity import check_streamed_forward
from reconstruct.jobs.calibration_tokens import calibration_tokens, validation_tokens
from reconstruct.jobs.job_state import JobState
from reconstruct.modelio.loaded import LoadedModel, load_model
from reconstruct.loop.allocation import compute_allocation
from reconstruct.loop.overlap import BlockReads, BlockWrite, BlockWriter, io_totals
from reconstruct.jobs.loraprune_stage import run_stage, stored_masks
from reconstruct.jobs.model_check_stage import run_model_check
from reconstruct.loop.block_report import BlockReport
from reconstruct.loop.pipeline import BlockPipeline
from reconstruct.faults import crash_point
from reconstruct.methods import SampleSplit, split_samples
from reconstruct.methods.train import log_training_budget
from reconstruct.modelio.output import REPORT_NAME, ModelFolderWriter, config_with_bias_flags
from reconstruct.planner import MemoryBudget, check_memory_plan, log_plan
from reconstruct.progress import progress_bar
from reconstruct.jobs.finish import finish_report, refresh_finished_report
from reconstruct.retrain.memory import choose_stream
from reconstruct.jobs.retrain_job import check_batch_split
from reconstruct.retrain.memory import RUN_FLAGS as RUN_RETRAIN_FLAGS, check_fits as check_retrain_memory
from reconstruct.jobs.retrain_stage import run_retrain_stage
from reconstruct.retrain.teacher import check_top_k
from reconstruct.state.model_check_record import save_unrepaired
from reconstruct.state.retrain_stage_record import read_stage
from reconstruct.host_allocator import unpool_large_allocations
from reconstruct.runtime import peak_gpu_mb, peak_rss_mb
from reconstruct.jobs.validation import resolve_evaluation, validate_job

logger = logging.getLogger(__name__)


def run_job(job: JobConfig, budget: MemoryBudget | None = None) -> dict:
    """Run (or resume) a job end to end; returns the report written to ``reconstruct.json``.

    First the checks that can fail fast (``validation``), then the memory plan (``reconstruct.planner``):
    a job whose plan exceeds ``budget`` (``--gpu-memory``/``--host-memory``, default: this machine's
    free memory) is refused with a ValueError naming the flags to change, and ``--offload auto``
    becomes the tier the plan chose. The plan is logged once ``--out`` has accepted the job, so a
    refusal is the last line a user sees, not one buried under the plan.
    """
    started = time.perf_counter()
    unpool_large_allocations()
    job = distributed.join(job)  # under torchrun: one rank of a data-parallel job (docs/distributed.md)

    def prepare():  # rank 0 first: it may convert a GGUF into the cache the others then read
        loaded = load_model(job.model, job.device, job.dtype)
        resolved = resolve_evaluation(job, loaded.config)  # --max-length: default and limit from the config
        validate_job(resolved, loaded)
        if job.check_stream:  # the streamed forward must be the model's own: refused before anything is written
            check_streamed_forward(loaded, job.calib.seq_len)
        if job.retrain is not None:  # the retraining stage at the end: refused now rather than after the loop
            check_retrain_memory(job.retrain, loaded, choose_stream(job.retrain, loaded), RUN_RETRAIN_FLAGS)
            check_batch_split(job.retrain.batch, "--retrain-samples-per-step")
            check_top_k(job.retrain, loaded, "--retrain-kd-top-k")  # the teacher is --model itself
        return loaded, check_memory_plan(resolved, loaded, budget, on_plan=plans.append)

    plans: list = []  # the plan, logged once the job state accepted the job
    loaded, job = distributed.agree(prepare, main_first=True)  # one rank refusing stops all
    with JobState.open(job, loaded) as state:
        for plan in plans:
            log_plan(plan)
        if state.finished and not distributed.from_main(lambda: retrain_pending(job)):
            if not distributed.is_main():
                return {"already_finished": True, **asdict(distributed.world())}
            logger.info("%s already holds this finished job; nothing to do", job.out)
            return {**refresh_finished_report(job, state), "already_finished": True}
        report = state.report() if state.finished else _run_blocks(job, loaded, state)
        if job.retrain is not None:  # every rank trains; rank 0 alone writes (jobs/retrain_stage.py)
            report = run_retrain_stage(job, loaded, state, assemble=reassemble_output)
        report["seconds_this_session"] = time.perf_counter() - started
        return report


def sample_split(job: JobConfig, n_calib: int, total: int) -> SampleSplit:
    """Which stream rows train each repair and which validate it; the same on every rank and resume.

    Args:
        job: the job (``--recon-val`` or ``--recon-val-data``).
        n_calib: calibration windows (all ranks together).
        total: rows of the streams: the calibration windows, then ``--recon-val-data``'s windows.
    """
    if job.recon_val_data is not None:
        return SampleSplit.with_validation_text(n_calib, total - n_calib)
    return split_samples(total, job.recon.val_fraction, job.calib.seed)


def retrain_pending(job: JobConfig) -> bool:
    """True when the job asks for the retraining stage and it has not finished in ``--out``."""
    return job.retrain is not None and not read_stage(job.out).get("finished")


def reassemble_output(job: JobConfig, loaded: LoadedModel, state: JobState) -> dict:
    """``assemble_output`` for a folder whose blocks changed (the retraining stage swapped them in)."""
    return assemble_output(job, loaded, state)


def _run_blocks(job: JobConfig, loaded: LoadedModel, state: JobState) -> dict:
    layout = loaded.layout
    if state.manifest.first_unfinished_block() == layout.n_blocks:  # killed while finishing
        logger.info("all %d blocks are done; writing the rest of the output", layout.n_blocks)
        return assemble_output(job, loaded, state)
    tokens = calibration_tokens(state, loaded)  # (n, T), the same on every rank
    n_calib = tokens.shape[0]
    if job.recon_val_data is not None:  # the validation text's windows: rows n .. n + m - 1 of the streams
        tokens = torch.cat([tokens, validation_tokens(state, loaded)])  # (n + m, T)
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
    split = None
    if job.recon is not None and job.recon.method != "none":
        split = sample_split(job, n_calib, shard.total)
        log_training_budget(job.recon, split)
    pipeline = BlockPipeline(job, layout, kwargs, loaded.device, loaded.config, split=split)
    pipeline.keep_unrepaired = state.model_check_on and distributed.is_main()  # --model-check: rank 0 saves them
    pipeline.block_sparsities = block_sparsities(job, loaded, state, pipeline, sparse, dense, stream_args)
    if job.prune.model_level_loraprune:  # LoRAPrune over the whole model: the masks of every block, before block 0
        run_stage(job, loaded, state, pipeline, sparse)
        pipeline.given_masks = lambda index: stored_masks(state, index)
    start_block = state.restore_streams(sparse, dense)
    if start_block == 0 and dense is not None:
        dense.copy_from(sparse)

    progress = progress_bar(range(start_block, layout.n_blocks), desc="blocks", unit="block", initial=start_block,
                            total=layout.n_blocks)
    writer = BlockWriter(background=job.overlap)
    failed = True
    with BlockReads(loaded, background=job.overlap) as reads:
        step = BlockStep(job, loaded, state, pipeline, reads, writer)
        try:
            for index in progress:
                run_block(step, index, sparse, dense)
            failed = False
        finally:
            final_wait = writer.close(failed)
    if final_wait:
        logger.info("waited %.1fs for the last block's writes", final_wait)
    return assemble_output(job, loaded, state, final_write_wait=final_wait)


@dataclass(frozen=True)
class BlockStep:
    """What :func:`run_block` needs besides the block index and the streams."""

    job: JobConfig
    loaded: LoadedModel
    state: JobState
    pipeline: BlockPipeline
    reads: BlockReads
    writer: BlockWriter


def run_block(step: BlockStep, index: int, sparse: ActivationStream, dense: ActivationStream | None) -> None:
    """One block: take its tensors (read ahead), process it, hand its writes to the writer, log its times.

    With the overlap on (``loop.overlap``), block ``index + 1`` is read while this one computes, and
    this block's shard, checkpoint and manifest are written while the next one computes.
    """
    job, loaded, layout = step.job, step.loaded, step.loaded.layout
    read, read_wait = step.reads.take(index)
    step.reads.prefetch(index + 1)
    started = time.perf_counter()
    block = loaded.blocks[index]
    prefix = layout.block_prefix(index)
    stored_dtypes = install_module_tensors(block, read.tensors, loaded.device, loaded.dtype, owned=True)
    read.tensors = {}  # the block owns them now
    block_report = step.pipeline.process(index, block, sparse, dense, stored_dtypes)
    tensors = module_tensors_for_output(block, prefix, stored_dtypes)
    unrepaired = step.pipeline.unrepaired  # --model-check: what the repair changed, as it was before it
    unrepaired = None if unrepaired is None else tensors_for_output(unrepaired, prefix, stored_dtypes)
    release_module_weights(block)
    tier_on_disk = sparse.tier == "disk"
    # The previous block's writes first: at most one stream copy in flight (the planner counts one), and
    # --checkpoint-every auto decides knowing how long the previous checkpoint took. Charged as a write wait.
    waited = step.writer.wait()
    streams = step.state.stream_snapshot(index, sparse, dense, private=job.overlap and not tier_on_disk)
    stats = {**asdict(block_report), "overlap": job.overlap, "read_seconds": read.read_seconds,
             "read_wait_seconds": read_wait, "compute_seconds": time.perf_counter() - started - waited}
    folder = ModelFolderWriter(job.out, layout.n_blocks)

    def write() -> None:  # in the writer's thread when the overlap is on
        crash_point(f"writer:{index}")
        write_started = time.perf_counter()
        if unrepaired is not None:  # before the block counts as done
            save_unrepaired(job.out, index, unrepaired)
        digest = folder.write_block(index, tensors) if distributed.is_main() else ""  # rank 0 alone writes
        stats["write_seconds"] = time.perf_counter() - write_started
        step.state.block_done(index, folder.block_file(index), digest, stats, streams)

    # A disk-tier stream is a memory map: its checkpoint is written before the next block changes it.
    step.writer.submit(BlockWrite(index, write, stats), sync=streams is not None and tier_on_disk)
    logger.info(
        "block %d/%d: %s%s, %.1fs (compute %.1fs, read wait %.1fs, write wait %.1fs)",
        index + 1, layout.n_blocks, describe_block_sparsity(block_report, getattr(step.pipeline, "structure", None)),
        ("" if block_report.mse_after is None else
         f", mse {block_report.mse_before or 0.0:.3g} → {block_report.mse_after:.3g}") + describe_guard(block_report),
        block_report.seconds, stats["compute_seconds"], read_wait, stats["write_wait_seconds"],
    )


def describe_block_sparsity(report, structure=None) -> str:
    """What a block lost, each number named: ``channels removed 35% (1075 of 3072); linear weights zero 15.0%``.

    Linear weights zero: the mean over the block's linears of each one's share of zeros (what
    ``--sparsity`` means for unstructured and N:M patterns; for heads/channels it is smaller, since
    only the linears holding them lose weights).
    """
    zero = sum(report.sparsity.values()) / max(len(report.sparsity), 1)
    text = f"linear weights zero {zero:.1%}"
    if report.experts.get("few_tokens"):
        text += (f"; {len(report.experts['few_tokens'])} of {report.experts['experts']} experts had fewer than "
                 f"{report.experts['min_tokens']} calibration tokens (pruned by magnitude)")
    for kind, attribute in (("heads", "num_heads"), ("channels", "channels")):
        total = getattr(structure, attribute, None)
        if kind in report.removed and isinstance(total, int) and total > 0:
            count = len(report.removed[kind])
            return f"{kind} removed {count / total:.0%} ({count} of {total}); {text}"
    return text


def block_sparsities(job: JobConfig, loaded: LoadedModel, state: JobState, pipeline: BlockPipeline,
                     sparse: ActivationStream, dense: ActivationStream | None, stream_args: dict) -> list[float] | None:
    """Each block's sparsity under ``--allocation`` (None: uniform), from the manifest or computed now.

    Called while ``sparse`` still holds block 0's inputs. OWL's pre-pass runs the dense model on a
    copy of them: in the dense stream (it is set from ``sparse`` again afterwards), else in a spare
    stream of the same tier, removed afterwards. The result is saved in the manifest before block 0.
    """
    if job.prune.allocation.uniform:
        return None
    if state.manifest.allocation is None:
        scratch = dense
        if scratch is None and job.needs_allocation_pass:  # a file's sparsities need no pass
            scratch = ActivationStream(sparse.n_samples, sparse.shape[1], sparse.shape[2],
                                       disk_path=state.stream_path("allocation"), **stream_args)
        # calibration rows only: --recon-val-data's rows never set a sparsity
        state.record_allocation(compute_allocation(job, loaded, pipeline.forward_fn, pipeline.calibration(sparse),
                                                   pipeline.calibration(scratch)))
        if scratch is not dense and scratch is not None:
            del scratch
            state.stream_path("allocation").unlink(missing_ok=True)
        crash_point("allocation")
    return list(state.manifest.allocation["sparsities"])


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
                              sparse: ActivationStream) -> BlockArguments:
    """Materialise the modules outside the blocks, capture block-0 inputs into ``sparse`` and every
    block's arguments, free the modules."""
    return loaded.capture_block_inputs(tokens, micro_batch, sparse.write)


def assemble_output(job: JobConfig, loaded: LoadedModel, state: JobState, final_write_wait: float = 0.0) -> dict:
    """Write the tensors outside the blocks, side files, config, index and report; mark the job finished.

    The model folder is completed by ``modelio.output.ModelFolderWriter`` (index last), as every command's is.
    Rank 0's work alone in a distributed run; the other ranks return ``{"rank", "size"}``.
    ``final_write_wait``: seconds the loop waited for the last block's writes after its compute.
    """
    if not distributed.is_main():
        return asdict(distributed.world())
    out = job.out
    folder = ModelFolderWriter(out, loaded.layout.n_blocks)
    folder.write_rest(loaded.read_outside_block_tensors())
    config = config_with_bias_flags(loaded.folder, loaded.layout.bias_flags, state.manifest.added_biases())
    written = folder.finish(loaded.folder, config)
    check = run_model_check(loaded, state)  # --model-check, on the loadable folder: keep or revert the repairs
    report = state.final_report(peak_rss_mb=peak_rss_mb(), peak_gpu_mb=peak_gpu_mb(loaded.device))
    if check is not None:
        report["model_check"] = check
    report["io"] = io_totals(report["blocks"], final_write_wait)  # compute vs read and write waits (loop.overlap)
    report["world_size"] = distributed.world().size  # processes that shared the calibration samples
    report["framing"] = {"calib_bos": job.calib.bos, **loaded.framing(job.calib.bos).record()}  # how windows started
    report = finish_report(job, report)  # --eval, then report.md / report.png
    atomic_write_json(out / REPORT_NAME, report)
    state.finish([folder.rest_file, *written, REPORT_NAME])
    return report
