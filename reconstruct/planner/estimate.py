"""The estimator: the phases of one job and their bytes for one activation-cache tier."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._pytree import tree_leaves

from reconstruct.planner.budget import MIB, human
from reconstruct.planner.plan import Item, MemoryPlan, Phase
from reconstruct.planner.probe import ModelProbe, in_out
from reconstruct.planner.tracing import trace_block
from pruners import get_pruner

logger = logging.getLogger(__name__)

HOST_BASELINE_BYTES = 448 * MIB  # the process after load_model: imports, skeleton, tokenizer (400 MiB measured, CPU torch)
CUDA_HOST_EXTRA_BYTES = 1536 * MIB  # host pages of the CUDA libraries once a context exists (estimate)
CUDA_CONTEXT_BYTES = 512 * MIB  # GPU memory of the CUDA context and cuBLAS workspaces, outside torch's allocator
CUDA_ALLOCATOR_SLACK = 0.10  # caching-allocator fragmentation, as a share of the per-block working set
TOKENIZE_BYTES_PER_CHAR = 90  # host memory of a fast tokenizer over a whole text (measured ~85 on WikiText-2)
NAMED_TEXT_CHARS = {"wikitext2": 11_000_000, "ptb": 5_000_000, "c4": 800_000_000}  # split sizes, approximate
ARGSORT_ROW_BYTES = 12  # stable argsort along N:M groups: int64 order + float32 values (profiled on CPU)
KTHVALUE_ROW_BYTES = 15  # per-row selection: kthvalue's float32 copy and int64 indices, bool masks (profiled on CPU)
ARGSORT_FLAT_BYTES = 20  # stable argsort of a flattened layer: one more int64 index buffer (profiled on CPU)
ADAMW_TEMPORARIES = 2  # foreach AdamW temporaries, in units of the trainable parameters
GENERATE_BATCH = 16  # calib.self_generated batch size


def _element_size(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def stream_bytes(n_samples: int, seq_len: int, hidden: int, dtype: torch.dtype) -> int:
    """Bytes of one activation stream (n, T, H) in the compute dtype (calib.activations)."""
    return n_samples * seq_len * hidden * _element_size(dtype)


def statistics_bytes(pruner: str, in_features: list[int]) -> int:
    """Bytes of the pruner statistics of linears with these input sizes (pruners.stats; float32 sums)."""
    if pruner == "wanda":
        return sum(4 * n + 8 for n in in_features)  # sum_sq (in,) float32 + int64 count
    if pruner == "sparsegpt":
        return sum(4 * n * n + 8 for n in in_features)  # xtx (in, in) float32 + int64 count
    return 0


def prune_temporary_bytes(pruner: str, out_features: int, in_features: int, dtype: torch.dtype, pattern) -> int:
    """Peak temporaries of ``loop.pipeline.prune_layer`` for one (out, in) linear, statistics excluded."""
    oi = out_features * in_features
    clone = 4 * oi if dtype == torch.float32 else 8 * oi  # .float().clone(): two copies for a moment
    if pruner == "sparsegpt":
        # H, the Cholesky factor L, its inverse and cholesky_inverse's workspace: four in x in float32
        # (profiled: 3.75 of them on CPU), then U with the weight sweep.
        return 4 * oi + oi + 4 * 4 * in_features * in_features
    if pattern.kind == "unstructured" and pattern.scope == "row":
        selection = KTHVALUE_ROW_BYTES * min(oi, max(1 << 24, in_features))  # pruners.masks.ROW_CHUNK_ELEMENTS
    elif pattern.kind == "unstructured":
        selection = ARGSORT_FLAT_BYTES * oi  # one argsort over the whole layer
    else:
        selection = ARGSORT_ROW_BYTES * oi  # N:M: one argsort over every group of m
    scores = 8 * oi  # |W| and |W| * norm (wanda) / |W| (magnitude), float32
    select = 4 * oi + 4 * oi + oi + selection  # weight, scores, keep mask, selection temporaries
    check = 4 * oi + 3 * oi  # weight; keep mask, weight == 0 and their union (bool)
    return max(clone, 4 * oi + scores, select, check) + (_element_size(dtype) * oi if dtype != torch.float32 else 0)


def _unit_objective(recon) -> bool:
    """loop.pipeline.uses_unit_objective: sub-layer/linear granularity or local targets need a dense block copy."""
    return getattr(recon, "granularity", "block") != "block" or getattr(recon, "target", "dense") != "dense"


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
    per_token = (8 * probe.hidden + 3 * widest) * _element_size(inputs.dtype)
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
    cuda = inputs.device_type == "cuda"
    dev = "device" if cuda else "host"
    e, es = _element_size(inputs.dtype), _element_size(inputs.stored_dtype)
    stream_place = {"device": dev, "cpu": "host", "disk": "disk"}[tier]
    input_copy = stream_place != dev  # reads copy micro-batches to the compute device
    trace = _trace_cached(traces, input_copy, inputs, probe, groups)

    linears = {name: in_out(probe.block.get_submodule(name)) for name in probe.layout.linear_names}
    block = probe.block_numel * e + probe.block_other_bytes
    block_stored = probe.block_numel * es + probe.block_other_bytes
    stream = stream_bytes(inputs.n_samples, inputs.seq_len, probe.hidden, inputs.dtype)
    masks = sum(o * i for o, i in linears.values())
    stats_by_group = [statistics_bytes(inputs.pruner, [linears[n][1] for n in group]) for group in groups]
    stats = max(stats_by_group, default=0)
    largest = max(linears.values(), key=lambda oi: oi[0] * oi[1])
    prune_tmp = max(prune_temporary_bytes(inputs.pruner, o, i, inputs.dtype, inputs.pattern) for o, i in linears.values())
    trainable = trace.get("trainable_bytes", 0)
    recon_state = trainable * (3 + ADAMW_TEMPORARIES)  # params, 2 AdamW moments, foreach temporaries
    slack = (lambda n: int(CUDA_ALLOCATOR_SLACK * n)) if cuda else (lambda n: 0)

    baseline = [Item("python, torch, transformers", HOST_BASELINE_BYTES + (CUDA_HOST_EXTRA_BYTES if cuda else 0), "host")]
    if cuda:
        baseline.append(Item("CUDA context", CUDA_CONTEXT_BYTES, "device"))
    tokens = Item("calibration tokens (int64)", 8 * inputs.n_samples * inputs.seq_len, "host")
    streams = Item(f"activation streams ({inputs.n_streams})", inputs.n_streams * stream, stream_place)
    kwargs_bytes = _kwargs_bytes(probe, inputs)
    kwargs = Item("block keyword arguments", kwargs_bytes, dev)
    held = baseline + [tokens, streams, kwargs]
    in_flight = in_flight_items(inputs, tier, block_stored, inputs.n_streams * stream)
    weights = Item("block weights", block, dev)
    mask_item = Item("keep masks (bool)", masks, dev)
    dtype_name = str(inputs.dtype).removeprefix("torch.")
    phases: list[Phase] = []
    notes: list[str] = []

    if inputs.calib == "self":
        model_bytes = probe.model_numel * e
        kv = 2 * probe.n_blocks * GENERATE_BATCH * inputs.seq_len * probe.hidden * e
        phases.append(Phase("self-calibration", baseline + [
            Item("whole model (from_pretrained, then moved)", model_bytes, "host"),
            *([Item("whole model on the GPU", model_bytes, "device"),
               Item("KV cache of generate()", kv, "device")] if cuda else [Item("KV cache of generate()", kv, "host")]),
        ]))
        notes.append(f"--calib self loads the whole model ({human(model_bytes)}) to sample calibration sequences; "
                     "the streaming rule holds only with a text --calib")
    else:
        chars = _text_chars(inputs.calib)
        phases.append(Phase("tokenizing calibration text", baseline + [
            Item("calibration text and tokenizer output", TOKENIZE_BYTES_PER_CHAR * chars, "host")]))
    capture_act = 3 * inputs.micro_batch * inputs.seq_len * probe.hidden * e
    phases.append(Phase("block-0 capture", held + [
        Item("embeddings and other modules before block 0", probe.outside_numel * e, dev),
        Item("their checkpoint pages (memory-mapped)", probe.outside_numel * es, "host"),
        Item("capture activations", capture_act, dev),
    ]))
    phases.append(Phase("block load", held + in_flight + [
        weights,
        Item("the block's checkpoint pages (memory-mapped, unmapped after the load)", block_stored, "host"),
        Item("block-0 only: pages of the modules before it, still mapped", probe.outside_numel * es, "host"),
    ]))
    base = held + [weights] + in_flight
    if inputs.allocation_pass:
        all_inputs = [i for _, i in linears.values()]
        phases.append(Phase(f"allocation pre-pass (--batch-size {inputs.micro_batch})", base + [
            Item("wanda statistics (every linear)", statistics_bytes("wanda", all_inputs), dev),
            Item("forward activations", trace["forward_plain"], dev),
            Item("outlier scores (largest linear, float32)", 4 * largest[0] * largest[1], dev),
            Item("allocator slack", slack(trace["forward_plain"]), dev),
        ]))
        notes.append("--allocation owl: before block 1, one more pass over the dense model (every block read once "
                     "more and run forward once, nothing pruned; the time of about one dense pass per block); its "
                     "per-block sparsities are saved in the manifest, so a resume does not repeat it")
    if inputs.check_stream:
        notes.append(f"stream check (--check-stream): before block 1, at every start, every block is read once more "
                     f"({human(probe.n_blocks * block_stored)} in all) and run twice on 2 short windows of at most "
                     "1024 tokens, beside the model's own forward; --no-check-stream skips it")
    if inputs.n_streams == 2:
        phases.append(Phase(f"dense pass (--batch-size {inputs.micro_batch})", base + [
            Item("forward activations", trace["forward_plain"], dev), Item("allocator slack", slack(trace["forward_plain"]), dev),
            *([Item("output micro-batch on its way to the stream", inputs.micro_batch * inputs.seq_len * probe.hidden * e,
                    "host")] if cuda and tier != "device" else []),
        ]))
    if trace.get("statistics_pass"):
        phases.append(Phase("statistics pass", base + [
            Item(f"{inputs.pruner} statistics", stats, dev), Item("forward activations + statistics temporaries",
                                                                 trace["statistics_pass"], dev),
            Item("allocator slack", slack(trace["statistics_pass"]), dev),
        ]))
    phases.append(Phase("pruning", base + [
        Item(f"{inputs.pruner} statistics", stats, dev), mask_item,
        Item("pruner temporaries (largest linear)", prune_tmp, dev), Item("allocator slack", slack(prune_tmp), dev),
    ]))
    recon_ws = recon_act = 0
    if inputs.recon is not None:
        step = trace.get("recon_step", 0)
        recon_act = max(step, trace.get("recon_eval", 0))
        recon_ws = masks + recon_state + recon_act
        unit = _unit_objective(inputs.recon)
        dense_copy = [Item("dense copy of the block (unit objective)", block, dev)] if unit else []
        if unit:  # its targets come from a no-grad forward of the dense copy inside every micro-step
            recon_act += trace.get("forward_plain_recon", trace["forward_plain"])
            notes.append("--granularity/--target other than block/dense keeps a dense copy of the block and runs it "
                         "inside every training step; the plan adds one block and one forward for it (not traced)")
        phases.append(Phase(f"reconstruction ({inputs.recon.method}, micro-batch {inputs.recon_micro_batch})", base + [
            mask_item, *dense_copy, Item("trainable params + grads + AdamW state + step temporaries", recon_state, dev),
            Item("forward/backward of one micro-batch (traced)", recon_act, dev),
            Item("allocator slack", slack(recon_act), dev),
        ]))
        phases.append(Phase("merge", base + [
            mask_item, *dense_copy, Item("trainable params + AdamW state", trainable * 3, dev),
            Item("merged weight temporaries (largest linear)", trace.get("merge", 0), dev),
        ]))
    phases.append(Phase(f"sparse pass (--batch-size {inputs.micro_batch})", base + [
        mask_item, Item("forward activations + MSE", trace["forward"], dev), Item("allocator slack", slack(trace["forward"]), dev),
    ]))
    output_copy = cuda or inputs.stored_dtype != inputs.dtype
    phases.append(Phase("block write", held + in_flight + [
        weights, *([Item("block tensors for the output shard", block_stored, "host")] if output_copy else []),
    ]))
    if cuda and tier == "device":
        phases.append(Phase("stream checkpoint", held + [
            Item("the streams copied to host for the checkpoint", inputs.n_streams * stream, "host")]))
    phases.append(Phase("output assembly", held + [
        Item("tensors outside the blocks incl. the LM head (memory-mapped)", (probe.outside_numel + probe.head_numel) * es, "host"),
    ]))
    if tier == "disk":
        notes.append("disk tier: the streams are memory-mapped files; their pages show in RSS while resident but "
                     "the kernel can drop them under pressure; resuming still loads a checkpoint whole into host memory")
    if in_flight:
        notes.append("block IO overlaps the compute: one block read ahead and one written behind (with its stream "
                     "checkpoint) are held in host memory; --no-overlap drops them and runs the IO serially")
    if cuda and tier == "device":
        notes.append("device tier: every stream checkpoint (--checkpoint-every) copies the streams to host memory")
    if inputs.pruner == "sparsegpt":
        notes.append("sparsegpt keeps one in x in float32 Gram matrix per linear, also for linears that read the "
                     f"same input (q/k/v), and all of a group at once ({human(stats)}); pruning one adds three "
                     "more in x in matrices (H, its Cholesky factor and inverse)")

    if getattr(get_pruner(inputs.pruner), "needs_block_training", False):
        notes.append(f"the {inputs.pruner} pruner trains the block to score weights; that pass is not in the plan")
    if getattr(inputs.pattern, "structured", False):
        notes.append(f"--pattern {inputs.pattern.kind}: pruner temporaries use the N:M formula (not profiled)")
    if trace.get("untraced"):
        notes.append("the block could not be traced on meta; activation sizes are a rough formula")

    sizes = {
        "block": block, "block_stored": block_stored, "stream": stream, "n_streams": inputs.n_streams,
        "forward": trace["forward"],
        "statistics": stats, "prune": prune_tmp, "masks": masks, "recon_working_set": recon_ws,
        "recon_activations": recon_act if inputs.recon else 0,
        "recon_step": trace.get("recon_step", 0), "recon_state": recon_state if inputs.recon else 0,
        "trainable": trainable, "merge": trace.get("merge", 0), "kwargs": kwargs_bytes,
    }
    method = inputs.recon.method if inputs.recon is not None else "none"
    title = (
        f"memory plan: {probe.architecture}, {probe.n_blocks} x {probe.block_class} (hidden {probe.hidden}, "
        f"{human(block)} per block in {dtype_name}) on {inputs.device_type}; {inputs.pruner}"
        f"{' --sequential' if inputs.sequential else ''}, method {method}; {inputs.n_samples} x {inputs.seq_len} "
        f"calibration tokens; largest linear {largest[0]} x {largest[1]}"
    )
    return MemoryPlan(
        title=title, device_type=inputs.device_type, stream_tier=tier, tier_note="", sizes=sizes, phases=phases,
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


def _text_chars(source: str) -> int:
    path = Path(source).expanduser()
    if path.is_file():
        return path.stat().st_size
    return NAMED_TEXT_CHARS.get(source, 0)
