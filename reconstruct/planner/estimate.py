"""The estimator: the phases of one job and their bytes for one activation-cache tier."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_leaves

from reconstruct.planner.budget import human
from reconstruct.planner.phases import TierSizes, build_phases, closing_notes
from reconstruct.planner.sizes import element_size
from reconstruct.planner.plan import Item, MemoryPlan
from reconstruct.planner.probe import ModelProbe, in_out
from reconstruct.planner.tracing import trace_block
from pruners import get_pruner

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class PlanInputs:
    """Everything the arithmetic needs, resolved."""

    device_type: str
    dtype: torch.dtype
    stored_dtype: torch.dtype
    n_samples: int
    seq_len: int
    micro_batch: int
    recon_micro_batch: int
    pruner: str
    pattern: object
    sequential: bool
    recon: object | None
    calib: str
    checkpoint_streams: bool
    n_streams: int  # 2 with the dense stream (reconstruction, LoRAPrune, --track-error), else 1
    allocation_pass: bool = False  # --allocation owl: a dense pass over every block before block 0
    overlap: bool = False  # block IO in the background (loop.overlap): one block read ahead, one written behind
    check_stream: bool = False  # --check-stream: the streamed forward compared with the model's own before block 1


def _trace_cached(traces: dict, key: bool, inputs: PlanInputs, probe: ModelProbe, groups) -> dict:
    if key not in traces:
        try:
            traces[key] = trace_block(probe, inputs.dtype, inputs.seq_len, inputs.micro_batch, inputs.recon_micro_batch,
                                      key, inputs.pruner, groups, inputs.recon)
        except Exception as error:  # an architecture the meta trace cannot run: a rough formula instead
            logger.warning("memory plan: could not trace the block on meta (%s); using a rough estimate", error)
            traces[key] = _rough_traces(inputs, probe)
            traces[key]["untraced"] = 1
    return traces[key]


def _rough_traces(inputs: PlanInputs, probe: ModelProbe) -> dict[str, int]:
    widest = max(max(in_out(probe.block.get_submodule(n))) for n in probe.layout.linear_names)
    per_token = (8 * probe.hidden + 3 * widest) * element_size(inputs.dtype)
    forward = inputs.micro_batch * inputs.seq_len * per_token
    recon = 3 * inputs.recon_micro_batch * inputs.seq_len * per_token
    return {"forward_plain": forward, "forward": forward, "statistics_pass": forward, "recon_eval": forward,
            "merge": 0, "recon_step": recon, "trainable_bytes": 0}


def in_flight_items(inputs: PlanInputs, tier: str, block_stored: int, streams: int) -> list[Item]:
    """Host buffers of the blocks in flight besides the computing one, with the overlap on (``loop.overlap``).

    One block read ahead (pinned on a GPU) and one written behind (its output tensors), both in the
    stored dtype, and the previous block's activation checkpoint: a private host copy of the streams
    unless they live on disk (a disk-tier checkpoint is written before the next block starts).
    A fixed count: the buffers do not grow with the number of blocks.
    """
    if not inputs.overlap:
        return []
    pinned = " (pinned)" if inputs.device_type == "cuda" else ""
    items = [Item(f"next block read ahead{pinned}", block_stored, "host"),
             Item("previous block's tensors being written", block_stored, "host")]
    if inputs.checkpoint_streams and tier != "disk":
        items.append(Item("previous block's stream checkpoint being written (a copy)", streams, "host"))
    return items


def plan_for_tier(inputs: PlanInputs, probe: ModelProbe, groups, tier: str, device_budget, host_budget,
                  traces: dict) -> MemoryPlan:
    """The plan of the job with its activation streams on one tier.

    Args:
        inputs: the job's resolved numbers.
        probe: one block of the model on ``meta`` and the model's sizes.
        groups: the linears pruned together (one group unless ``--sequential``).
        tier: where the streams live: ``device``, ``cpu`` or ``disk``.
        device_budget: bytes of GPU memory the job may use (unused on CPU).
        host_budget: bytes of host memory the job may use.
        traces: cache of block traces, keyed by whether reads copy micro-batches to the device;
            filled on first use and shared between tiers.

    Returns:
        The phases, their peaks, and whether they fit the budgets.
    """
    stream_place = {"device": "device" if inputs.device_type == "cuda" else "host", "cpu": "host", "disk": "disk"}[tier]
    input_copy = stream_place != ("device" if inputs.device_type == "cuda" else "host")  # reads copy micro-batches
    trace = _trace_cached(traces, input_copy, inputs, probe, groups)
    sizes = TierSizes.measure(inputs, probe, groups, tier, trace)
    kwargs_bytes = _kwargs_bytes(probe, inputs)
    held = sizes.held_items(kwargs_bytes)
    sizes.in_flight = in_flight_items(inputs, tier, sizes.block_stored, inputs.n_streams * sizes.stream)
    phases, notes = build_phases(sizes, held)
    notes += closing_notes(sizes, get_pruner(inputs.pruner))
    dtype_name = str(inputs.dtype).removeprefix("torch.")
    method = inputs.recon.method if inputs.recon is not None else "none"
    title = (
        f"memory plan: {probe.architecture}, {probe.n_blocks} x {probe.block_class} (hidden {probe.hidden}, "
        f"{human(sizes.block)} per block in {dtype_name}) on {inputs.device_type}; {inputs.pruner}"
        f"{' --sequential' if inputs.sequential else ''}, method {method}; {inputs.n_samples} x {inputs.seq_len} "
        f"calibration tokens; largest linear {sizes.largest[0]} x {sizes.largest[1]}"
    )
    cuda = inputs.device_type == "cuda"
    return MemoryPlan(
        title=title, device_type=inputs.device_type, stream_tier=tier, tier_note="",
        sizes=sizes.summary(kwargs_bytes), phases=phases,
        device_budget=device_budget if cuda else None, host_budget=host_budget, notes=notes,
        job_micro_batch=inputs.micro_batch, recon_micro_batch=inputs.recon_micro_batch,
    )


def _kwargs_bytes(probe: ModelProbe, inputs: PlanInputs) -> int:
    sizes = {1, inputs.micro_batch, inputs.recon_micro_batch, inputs.n_samples % inputs.micro_batch or inputs.micro_batch}
    total = 0
    for size in sizes:
        seen: set[int] = set()
        call = probe.arguments.call(0, size)
        for tensor in tree_leaves((call.args, call.kwargs)):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage()._cdata not in seen:
                seen.add(tensor.untyped_storage()._cdata)
                total += tensor.untyped_storage().nbytes()
    return total
