"""The memory planner: what one job needs on the device and on the host, predicted before any work.

``reconstruct plan`` prints it and ``reconstruct run`` logs it and refuses to start when it does not
fit. The plan follows what the engine actually does, phase by phase (calibration, block-0 capture,
then per block: load, dense pass, statistics, prune, reconstruction, merge, sparse pass, write,
stream checkpoint; finally the assembly of the output), and reports the largest phase on each side.

Where the numbers come from:

- Tensors the engine allocates with known shapes (one block's weights, the two activation streams,
  keep masks, pruner statistics, adapters and AdamW state, the pruner's temporaries) are counted
  from the model's config: exact for the tensors, formulas for the pruners' temporaries.
- Activations of the forward passes and of one reconstruction micro-batch (forward, loss, backward,
  with the method's adapters attached) are *traced*: one block is built on the ``meta`` device at
  the real shapes and dtype, the engine's own forward and loss run on it, and a dispatch mode adds
  up the bytes of every storage alive at each op (what autograd saves for backward included). Meta
  runs attention through PyTorch's math path, so ``scaled_dot_product_attention`` is routed to the
  CPU flash-attention op, whose saved tensors (output, log-sum-exp) match the fused kernels that
  CPUs and GPUs use; an explicit eager attention is traced as it is.
- Constants nobody can trace from here (the interpreter with torch imported, the CUDA context, the
  caching allocator's slack, tokenizer memory per character) are named below with their source.

Everything in the device column goes to the host when the device is the CPU.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

logger = logging.getLogger(__name__)

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30

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

UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
         "tb": 10**12, "kib": KIB, "mib": MIB, "gib": GIB, "tib": 1 << 40}


def parse_bytes(text: str, flag: str = "--gpu-memory") -> int:
    """``"24GiB"``, ``"24GB"``, ``"512MiB"``, ``"1e9"`` → bytes. GB = 10^9, GiB = 2^30.

    Raises:
        ValueError: naming ``flag`` when the text is not a positive size.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"{flag} must be a size such as 24GiB, 80GB or 512MiB; got {text!r}")
    return int(float(match.group(1)) * UNITS[unit])


def human(n_bytes: float) -> str:
    """Bytes as a short binary size: ``1.50 GiB``, ``12.0 MiB``."""
    for unit, size in (("TiB", 1 << 40), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(n_bytes) >= size:
            return f"{n_bytes / size:.2f} {unit}" if unit in ("TiB", "GiB") else f"{n_bytes / size:.1f} {unit}"
    return f"{int(n_bytes)} B"


@dataclass(frozen=True)
class MemoryBudget:
    """What the job may use; None = measure this machine (free GPU memory, available host memory)."""

    device_bytes: int | None = None  # --gpu-memory
    host_bytes: int | None = None  # --host-memory


# --------------------------------------------------------------------------- the plan
@dataclass
class Item:
    """One allocation in one phase."""

    name: str
    nbytes: int
    place: str  # "device", "host" or "disk"


@dataclass
class Phase:
    """What is alive at the peak of one step of the job."""

    name: str
    items: list[Item]

    def total(self, place: str) -> int:
        """Bytes alive on ``place`` in this phase."""
        return sum(item.nbytes for item in self.items if item.place == place)


@dataclass
class MemoryPlan:
    """The predicted memory of one job. Build it with :func:`plan_job` or :func:`plan_from_config`."""

    title: str  # model, device, dtype, job in one line
    device_type: str  # "cuda" or "cpu"
    stream_tier: str  # device, cpu or disk: where the activation streams go
    tier_note: str  # why that tier
    sizes: dict[str, int]  # the headline quantities (block, streams, working set parts)
    phases: list[Phase]
    device_budget: int | None
    host_budget: int | None
    notes: list[str] = field(default_factory=list)
    job_micro_batch: int = 1
    recon_micro_batch: int = 1
    device_reason: str = ""  # which device the plan is for and why (``reconstruct plan``)

    def peak(self, place: str) -> tuple[int, str]:
        """(bytes, phase name) of the largest phase on ``place``."""
        best = max(self.phases, key=lambda phase: phase.total(place))
        return best.total(place), best.name

    @property
    def device_peak(self) -> int:
        """Predicted peak GPU memory (0 on CPU runs: everything is host memory)."""
        return self.peak("device")[0] if self.device_type == "cuda" else 0

    @property
    def host_peak(self) -> int:
        """Predicted peak host memory (RSS)."""
        return self.peak("host")[0]

    def problems(self) -> list[str]:
        """One line per side whose peak exceeds its budget."""
        found = []
        if self.device_type == "cuda" and self.device_budget is not None and self.device_peak > self.device_budget:
            found.append(f"GPU: peak {human(self.device_peak)} ({self.peak('device')[1]}) > budget "
                         f"{human(self.device_budget)}")
        if self.host_budget is not None and self.host_peak > self.host_budget:
            found.append(f"host: peak {human(self.host_peak)} ({self.peak('host')[1]}) > budget "
                         f"{human(self.host_budget)}")
        return found

    @property
    def fits(self) -> bool:
        """True when both peaks are within their budgets (an unknown budget always fits)."""
        return not self.problems()

    def advice(self) -> list[str]:
        """Flags that would shrink the side(s) over budget, most effective first."""
        tips: list[str] = []
        streams = self.sizes["n_streams"] * self.sizes["stream"]
        over_device = self.device_type == "cuda" and self.device_budget is not None and self.device_peak > self.device_budget
        over_host = self.host_budget is not None and self.host_peak > self.host_budget
        if over_device and self.stream_tier == "device":
            tips.append(f"--offload cpu (moves the {human(streams)} of activation streams to host memory)")
        streams_on_host = self.stream_tier == "cpu" or (self.stream_tier == "device" and self.device_type == "cpu")
        if over_host and streams_on_host:
            tips.append(f"--offload disk (moves the {human(streams)} of activation streams to memory-mapped files)")
        over_in_self = [place for place, over in (("device", over_device), ("host", over_host))
                        if over and self.peak(place)[1] == "self-calibration"]
        if over_in_self:
            tips.insert(0, "--calib <text file> (--calib self loads the whole model to sample sequences)")
        forward = self.sizes.get("forward", 0)
        if self.job_micro_batch > 1 and (over_device or (over_host and self.device_type == "cpu")):
            tips.append(f"--micro-batch {max(1, self.job_micro_batch // 4)} (forward activations at --micro-batch "
                        f"{self.job_micro_batch}: {human(forward)})")
        tips.append(f"--n-samples / --seq-len (each stream is n_samples x seq_len x hidden: {human(self.sizes['stream'])}; "
                    "--seq-len also shrinks every activation)")
        if self.sizes.get("statistics", 0) > GIB:
            tips.append(f"--sequential (pruner statistics for one sub-layer group at a time instead of "
                        f"{human(self.sizes['statistics'])})")
        return tips

    def refusal(self) -> str:
        """The one-line error ``run`` raises when the plan does not fit."""
        return (
            "the memory plan does not fit: " + "; ".join(self.problems())
            + ". Change: " + "; ".join(self.advice())
            + " (see `reconstruct plan` with the same flags; --gpu-memory/--host-memory set the budgets)"
        )

    def format(self) -> str:
        """The plan as text: headline sizes, where each goes, the peak phase of each side."""
        dev = "device" if self.device_type == "cuda" else "host"
        sizes = self.sizes
        stream_place = {"device": dev, "cpu": "host" + (" (pinned)" if self.device_type == "cuda" else ""),
                        "disk": "disk (memory-mapped files)"}[self.stream_tier]
        lines = [self.title, *([f"device: {self.device_reason}"] if self.device_reason else []), ""]
        rows = [
            ("one block (weights)", sizes["block"], dev),
            ("activation streams", sizes["n_streams"] * sizes["stream"],
             f"{stream_place}: {sizes['n_streams']} x {human(sizes['stream'])}; {self.tier_note}"),
            (f"forward, --micro-batch {self.job_micro_batch}", sizes["forward"], dev),
            ("pruner statistics (largest group)", sizes["statistics"], dev),
            ("pruner temporaries (largest linear)", sizes["prune"], dev),
            ("keep masks", sizes["masks"], dev),
        ]
        if sizes.get("recon_working_set"):
            rows += [
                ("reconstruction working set", sizes["recon_working_set"], dev),
                (f"  fwd/bwd of {self.recon_micro_batch} sample(s) with adapters", sizes["recon_activations"],
                 "traced (or the MSE pass at --micro-batch, if larger)"),
                ("  trainable params + AdamW state", sizes["recon_state"], "params, 2 moments, step temporaries"),
                ("  keep masks (counted above)", sizes["masks"], ""),
                ("merge temporaries", sizes["merge"], "largest linear, after training"),
            ]
        width = max(len(name) for name, _, _ in rows)
        for name, value, where in rows:
            lines.append(f"  {name:<{width}}  {human(value):>11}  {where}")
        lines.append("")
        for place, budget, flag in (("device", self.device_budget, "--gpu-memory"), ("host", self.host_budget, "--host-memory")):
            if place == "device" and self.device_type != "cuda":
                continue
            total, phase_name = self.peak(place)
            verdict = "unknown budget" if budget is None else (
                f"fits in {human(budget)}" if total <= budget else f"DOES NOT FIT in {human(budget)}")
            label = "GPU" if place == "device" else "host"
            lines.append(f"  peak {label}: {human(total)} during {phase_name}: {verdict} ({flag})")
            phase = next(p for p in self.phases if p.name == phase_name)
            for item in sorted(phase.items, key=lambda it: -it.nbytes):
                if item.place == place and item.nbytes > 0:
                    lines.append(f"      {human(item.nbytes):>11}  {item.name}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        if not self.fits:
            lines.append("  to fit: " + "; ".join(self.advice()))
        return "\n".join(lines)


# --------------------------------------------------------------------------- tracing on meta
class _LiveBytes(TorchDispatchMode):
    """Adds up the bytes of storages created inside the mode and still alive, op by op; keeps the peak."""

    def __init__(self) -> None:
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._weak = StorageWeakRef
        self.live: dict[int, tuple[object, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in self.live and key not in inputs:  # views and in-place results are not new
                    self.live[key] = (self._weak(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


class _FusedAttention(TorchFunctionMode):
    """Route ``scaled_dot_product_attention`` to the flash-attention op (meta has no fused kernel)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            try:
                return _flash_attention(*args, **kwargs)
            except Exception:  # a shape/mask the op does not take: trace the math path instead
                pass
        return func(*args, **kwargs)


def _flash_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if key.shape[-3] != query.shape[-3] and not enable_gqa:  # the caller repeats shared heads itself otherwise
        raise ValueError("grouped-query attention without enable_gqa")
    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
    )
    return out


def trace_peak(fn: Callable[[], object]) -> int:
    """Peak bytes of the storages ``fn`` allocates and keeps alive (meta tensors: nothing is computed)."""
    with _FusedAttention(), _LiveBytes() as tracker:
        result = fn()
    del result
    return tracker.peak


# --------------------------------------------------------------------------- the model's shape
@dataclass
class ModelProbe:
    """One block of the model on ``meta`` with its block-0 keyword arguments, plus the model's sizes."""

    architecture: str
    block_class: str
    n_blocks: int
    hidden: int
    block: nn.Module  # on meta, in the compute dtype
    layout: object  # reconstruct.modelio.architecture.BlockLayout of the probe model
    kwargs: object  # calib.capture.BlockKwargs on meta
    block_numel: int  # floating parameters and buffers of one block
    block_other_bytes: int  # non-floating tensors of one block
    outside_numel: int  # tensors outside the blocks, LM head excluded (materialised for the capture)
    head_numel: int  # the LM head when it is not tied (read for the output)
    model_numel: int  # every parameter of the model


def _one_block_config(config):
    probe = copy.deepcopy(config)
    probe.num_hidden_layers = 1
    for name in ("layer_types", "mlp_only_layers"):  # per-layer lists some families validate against the depth
        value = getattr(probe, name, None)
        if isinstance(value, list) and len(value) > 1:
            setattr(probe, name, value[:1])
    return probe


def probe_model(config, dtype: torch.dtype, seq_len: int, layout=None) -> ModelProbe:
    """Build one block of ``config`` on meta and capture its keyword arguments at ``seq_len`` tokens.

    The modules before the blocks are materialised (uninitialised, on the CPU) so the model's own
    forward computes the block-0 keyword arguments (position ids and embeddings, masks) exactly as
    the engine's capture does; their memory is touched only where the zero tokens read it.
    ``layout`` (the engine's, when it has one) saves discovering it again.
    """
    from calib.capture import BlockKwargs, capture_block_inputs
    from reconstruct.modelio.architecture import build_skeleton, discover_layout

    n_blocks = int(config.num_hidden_layers)
    try:
        model = build_skeleton(_one_block_config(config), dtype)
    except Exception:  # a family whose config cannot shrink: the full skeleton is on meta anyway
        model = build_skeleton(config, dtype)
    if layout is None:
        layout = discover_layout(model, config)
    blocks = model.get_submodule(layout.blocks_path)
    block = blocks[0]
    head = model.get_output_embeddings()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    block_ids = {id(p) for p in block.parameters()}
    head_ids = {id(p) for p in head.parameters()} if head is not None and not tied else set()  # tied: the embedding
    outside_numel = sum(p.numel() for p in model.parameters() if id(p) not in block_ids and id(p) not in head_ids)
    head_numel = 0 if tied or head is None else sum(p.numel() for p in head.parameters())
    block_numel = sum(t.numel() for t in list(block.parameters()) + list(block.buffers()) if t.is_floating_point())
    block_other = sum(t.numel() * t.element_size() for t in block.buffers() if not t.is_floating_point())
    per_block = sum(p.numel() for p in block.parameters())
    model_numel = outside_numel + head_numel + n_blocks * per_block

    for module in model.modules():  # materialise what runs before block 0 (not the blocks, not the head)
        if module is head or any(module is b for b in blocks):
            continue
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta and id(param) not in block_ids and id(param) not in head_ids:
                module._parameters[name] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype), requires_grad=False)
    by_size: dict[int, dict] = {}
    for size in (1, 2):  # BlockKwargs expands these to any micro-batch, as the engine's capture does
        tokens = torch.zeros(size, seq_len, dtype=torch.long)
        by_size.update(capture_block_inputs(model, block, tokens, size, lambda rows, x: None, torch.device("cpu")))
    kwargs = BlockKwargs(by_size).to(torch.device("meta"))
    block.to("meta").requires_grad_(False)  # frozen, as block_io loads it: no weight gradients
    return ModelProbe(
        architecture=type(model).__name__, block_class=layout.block_class, n_blocks=n_blocks,
        hidden=int(config.hidden_size), block=block, layout=layout, kwargs=kwargs, block_numel=block_numel,
        block_other_bytes=block_other, outside_numel=outside_numel, head_numel=head_numel, model_numel=model_numel,
    )


# --------------------------------------------------------------------------- arithmetic of the engine
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
    """Peak temporaries of ``engine.prune_layer`` for one (out, in) linear, statistics excluded."""
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


# --------------------------------------------------------------------------- traces of one block
def _forward(block, kwargs):
    from calib.capture import block_output

    return lambda hidden: block_output(block(hidden, **kwargs.for_batch(hidden.shape[0])))


def trace_block(probe: ModelProbe, dtype: torch.dtype, seq_len: int, micro_batch: int, recon_micro_batch: int,
                input_copy: bool, pruner: str, groups: list[list[str]], recon) -> dict[str, int]:
    """Traced peaks of one block's passes (meta, exact shapes): forward, statistics, reconstruction."""
    from reconstruct.loop.hooks import feeding_statistics
    from pruners import get_pruner

    block = probe.block
    forward = _forward(block, probe.kwargs)
    hidden = probe.hidden
    meta = torch.device("meta")

    def batch(size: int) -> torch.Tensor:
        return torch.empty(size, seq_len, hidden, dtype=dtype, device=meta)

    outside = {size: batch(size) for size in {micro_batch, recon_micro_batch}}  # views of a device stream: no new memory

    def read(size: int) -> torch.Tensor:
        return batch(size) if input_copy else outside[size]

    def compare_pass(size: int):  # engine.run_stream with compare_with / methods.evaluate_mse
        output = forward(read(size))
        diff = output.float() - read(size).float()
        return diff.pow(2).sum(), output

    result = {}
    with torch.no_grad():
        result["forward_plain"] = trace_peak(lambda: forward(read(micro_batch)))
        result["forward_plain_recon"] = trace_peak(lambda: forward(read(recon_micro_batch)))
        result["forward"] = max(result["forward_plain"], trace_peak(lambda: compare_pass(micro_batch)))
        linears = {name: block.get_submodule(name) for name in probe.layout.linear_names}
        stats_pass = 0
        pruner_obj = get_pruner(pruner)
        if pruner_obj.needs_calibration:
            for group in groups:
                stats = {name: pruner_obj.new_stats(_in_out(linears[name])[1], meta) for name in group}
                with feeding_statistics({name: linears[name] for name in group}, stats):
                    stats_pass = max(stats_pass, trace_peak(lambda: forward(read(micro_batch))))
        result["statistics_pass"] = stats_pass
    if recon is None or recon.method == "none":
        return result
    trainable, wrappers, undo = _attach_on_meta(block, linears, recon, probe.layout)
    try:
        with torch.no_grad():
            result["recon_eval"] = trace_peak(lambda: compare_pass(micro_batch))  # MSE before, at --micro-batch
            result["merge"] = max((trace_peak(w.merged_weight) for w in wrappers), default=0)

        def micro_step():  # methods.train: forward, float32 MSE, backward (gradients stay)
            out = forward(read(recon_micro_batch)).float()
            target = read(recon_micro_batch).float()
            loss = torch.sum((out - target) ** 2) / (target[0].numel() * recon_micro_batch)
            loss.backward()
            return [p.grad for p in trainable]

        result["recon_step"] = trace_peak(micro_step) if recon.steps > 0 and trainable else 0
        result["trainable_bytes"] = sum(p.numel() * p.element_size() for p in trainable)
    finally:
        undo()
    return result


def _unit_objective(recon) -> bool:
    """engine.uses_unit_objective: sub-layer/linear granularity or local targets need a dense block copy."""
    return getattr(recon, "granularity", "block") != "block" or getattr(recon, "target", "dense") != "dense"


def _in_out(linear: nn.Module) -> tuple[int, int]:
    from reconstruct.modelio.architecture import weight_as_out_in

    out_features, in_features = weight_as_out_in(linear).shape
    return int(out_features), int(in_features)


def _attach_on_meta(block, linears, recon, layout):
    """The method's trainable state on the meta block, as ``attach_method`` builds it (no data checks)."""
    from reconstruct.methods.adapters import LowRankLinear
    from reconstruct.methods.bias_norm import bias_masters, norm_masters
    from reconstruct.methods.spec import LOW_RANK_METHODS

    wrappers, masters = [], {}
    swapped = []
    if recon.method in LOW_RANK_METHODS:
        for name, linear in linears.items():
            keep = torch.empty(_in_out(linear), dtype=torch.bool, device="meta")  # (out, in)
            wrapper = LowRankLinear(linear, keep, kind=recon.method, rank=recon.rank, alpha=recon.alpha, seed=0)
            parent_name, _, attr = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            setattr(parent, attr, wrapper)
            swapped.append((parent, attr, linear))
            wrappers.append(wrapper)
    if recon.method in ("bias", "bias-ln"):
        flagged = {name for names in layout.bias_flags.values() for name in names}
        bias_linears = {name for name, m in linears.items() if m.bias is not None or name in flagged}
        masters.update(bias_masters(linears, bias_linears, torch.float32))
    if recon.method in ("ln", "bias-ln"):
        masters.update(norm_masters(block, torch.float32))
    trainable = [p for w in wrappers for p in (w.lora_A, w.lora_B)] + [m.master for m in masters.values()]

    def undo():
        for parent, attr, linear in swapped:
            setattr(parent, attr, linear)
        for master in masters.values():
            master.restore(None)
        for param in trainable:
            param.grad = None

    return trainable, wrappers, undo


def _sequential_groups(probe: ModelProbe, seq_len: int) -> list[list[str]]:
    """Sub-layer groups as the engine finds them (linears reading the same tensor), on the meta block."""
    from reconstruct.loop.hooks import group_by_shared_input

    linears = {name: probe.block.get_submodule(name) for name in probe.layout.linear_names}
    record: list = []
    handles = []
    try:
        for name, module in linears.items():
            def hook(module, args, name=name):
                record.append((name, id(args[0]), tuple(args[0].shape)))  # meta tensors have no data pointer
            handles.append(module.register_forward_pre_hook(hook))
        with torch.no_grad(), _FusedAttention():
            out = _forward(probe.block, probe.kwargs)(
                torch.empty(1, seq_len, probe.hidden, dtype=next(probe.block.parameters()).dtype, device="meta"))
            del out
    finally:
        for handle in handles:
            handle.remove()
    return group_by_shared_input(record)


# --------------------------------------------------------------------------- the planner
@dataclass(frozen=True)
class _Inputs:
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


def plan_job(job, loaded, budget: MemoryBudget | None = None) -> MemoryPlan:
    """The plan of ``job`` for a model already opened by the engine (``LoadedModel``)."""
    stored = _config_dtype(loaded.config) or torch.float32
    return _plan(job, loaded.config, loaded.device.type, loaded.dtype, stored, budget or MemoryBudget(),
                 cuda_index=loaded.device.index, layout=loaded.layout)


def check_memory_plan(job, loaded, budget: MemoryBudget | None = None):
    """Plan ``job``, log the plan, refuse it when it cannot fit; return it with ``--offload`` resolved.

    The returned job names the stream tier the plan was made for (``--offload auto`` → device, cpu
    or disk), so the engine and the plan agree. ``offload`` is not part of the resume fingerprint.

    Raises:
        ValueError: the plan does not fit its budgets; the message names the flags to change.
    """
    try:
        plan = plan_job(job, loaded, budget)
    except ValueError:
        raise
    except Exception as error:  # the plan is advice: a model it cannot probe still runs
        logger.warning("memory plan unavailable (%s: %s); --offload %s decides the tier as before",
                       type(error).__name__, error, job.offload)
        return job
    log_plan(plan)
    if not plan.fits:
        raise ValueError(plan.refusal())
    return replace(job, offload=plan.stream_tier)


def plan_from_config(job, config_path: Path | None, budget: MemoryBudget | None = None) -> MemoryPlan:
    """The plan of ``job`` from a ``config.json`` alone (no weights needed), or from ``job.model``'s config.

    The device may be one this machine lacks (``--device cuda`` on a laptop): give its memory with
    ``budget.device_bytes``.
    """
    from reconstruct.modelio.architecture import load_config
    from reconstruct.runtime import resolve_dtype
    from reconstruct.validation import check_calib_seq_len

    if config_path is not None:
        config_path = Path(config_path).expanduser()
        if config_path.is_dir():
            config_path = config_path / "config.json"
        if not config_path.is_file():
            raise ValueError(f"--config {config_path}: no such file")
        config = _load_config_file(config_path)
    else:
        from reconstruct.modelio.source import resolve_model

        config = load_config(resolve_model(job.model))
    budget = budget or MemoryBudget()
    device_type, reason = planned_device(job.device, budget.device_bytes)
    check_calib_seq_len(job.calib.seq_len, config)  # --seq-len longer than the context: refused like run
    checkpoint_dtype = _config_dtype(config)
    dtype = resolve_dtype(job.dtype, torch.device(device_type), checkpoint_dtype)
    plan = _plan(job, config, device_type, dtype, checkpoint_dtype or torch.float32, budget)
    plan.device_reason = reason
    return plan


def planned_device(device: str, gpu_budget: int | None) -> tuple[str, str]:
    """The device type ``reconstruct plan`` plans for, and one line saying why.

    ``--device auto`` plans for a GPU when this machine has one or when ``--gpu-memory`` gives a GPU
    budget (a plan for a GPU elsewhere), else for the CPU.

    Args:
        device: the ``--device`` flag.
        gpu_budget: ``--gpu-memory`` in bytes, or None.
    """
    if device != "auto":
        device_type = _device_type(device)
        if device_type == "cpu" and gpu_budget is not None:
            return device_type, "cpu (--device cpu; --gpu-memory is ignored on the CPU)"
        return device_type, f"{device_type} (--device {device})"
    if torch.cuda.is_available():
        return "cuda", "cuda (--device auto: this machine has a GPU)"
    if gpu_budget is not None:
        return "cuda", "cuda (--device auto with --gpu-memory: a GPU this machine lacks; --device cpu plans for the CPU)"
    return "cpu", "cpu (--device auto: no GPU on this machine; --device cuda --gpu-memory SIZE plans for one)"


def _load_config_file(path: Path):
    import json

    from transformers import AutoConfig

    from reconstruct.modelio.architecture import CAUSAL_LM_SUFFIXES

    try:
        data = json.loads(path.read_text())
        model_type = data.pop("model_type")
        config = AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError, OSError) as error:
        raise ValueError(f"--config {path}: transformers cannot read it ({error})") from None
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(name.endswith(CAUSAL_LM_SUFFIXES) for name in architectures):
        raise ValueError(f"--config {path}: {', '.join(architectures)} is not a causal LM")
    return config


def _device_type(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(name).type
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None


def _config_dtype(config) -> torch.dtype | None:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def _budgets(device_type: str, budget: MemoryBudget, cuda_index: int | None) -> tuple[int | None, int]:
    import psutil

    host = budget.host_bytes
    if host is None:  # what this process may still take, plus what it holds already (in the plan's baseline)
        host = psutil.virtual_memory().available + psutil.Process().memory_info().rss
    device = budget.device_bytes
    if device is None and device_type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: there is no CUDA device here to measure; give its memory with "
                             "--gpu-memory (e.g. 24GiB) to plan for one")
        free, _ = torch.cuda.mem_get_info(cuda_index or 0)
        device = free
    return device, host


def _plan(job, config, device_type: str, dtype: torch.dtype, stored_dtype: torch.dtype, budget: MemoryBudget,
          cuda_index: int | None = None, layout=None) -> MemoryPlan:
    device_budget, host_budget = _budgets(device_type, budget, cuda_index)
    recon = job.recon if job.recon is not None and job.recon.method != "none" else None
    n_samples, seq_len = _samples_of_this_rank(job.calib.n_samples), job.calib.seq_len
    recon_mb = min(recon.micro_batch, recon.batch_size, n_samples) if recon is not None else 1
    inputs = _Inputs(
        device_type=device_type, dtype=dtype, stored_dtype=stored_dtype, n_samples=n_samples, seq_len=seq_len,
        micro_batch=min(job.micro_batch, n_samples), recon_micro_batch=recon_mb, pruner=job.prune.pruner,
        pattern=job.prune.pattern, sequential=job.prune.sequential, recon=recon, calib=job.calib.source,
        checkpoint_streams=True, n_streams=job.n_streams,
    )
    probe = probe_model(config, dtype, seq_len, layout)
    groups = _sequential_groups(probe, seq_len) if inputs.sequential else [list(probe.layout.linear_names)]
    traces: dict[str, dict] = {}
    tiers = [job.offload] if job.offload != "auto" else (["device", "cpu", "disk"] if device_type == "cuda" else ["cpu", "disk"])
    plan = None
    for tier in tiers:
        plan = _plan_for_tier(inputs, probe, groups, tier, device_budget, host_budget, traces)
        if job.offload == "auto":
            plan.tier_note = f"--offload auto chose {tier}" + (
                " (the fastest tier that fits)" if plan.fits else " (nothing fits)")
            if plan.fits:
                break
        else:
            plan.tier_note = f"--offload {tier}"
    assert plan is not None
    return plan


def _samples_of_this_rank(n_samples: int) -> int:
    """Calibration samples this process holds: all of them, or its share under torchrun."""
    from reconstruct.parallel import distributed

    shard = distributed.split_samples(n_samples)
    return shard.stop - shard.start


def _trace_cached(traces: dict, key: bool, inputs: _Inputs, probe: ModelProbe, groups) -> dict:
    if key not in traces:
        try:
            traces[key] = trace_block(probe, inputs.dtype, inputs.seq_len, inputs.micro_batch, inputs.recon_micro_batch,
                                      key, inputs.pruner, groups, inputs.recon)
        except Exception as error:  # an architecture the meta trace cannot run: a rough formula instead
            logger.warning("memory plan: could not trace the block on meta (%s); using a rough estimate", error)
            traces[key] = _rough_traces(inputs, probe)
            traces[key]["untraced"] = 1
    return traces[key]


def _rough_traces(inputs: _Inputs, probe: ModelProbe) -> dict[str, int]:
    widest = max(max(_in_out(probe.block.get_submodule(n))) for n in probe.layout.linear_names)
    per_token = (8 * probe.hidden + 3 * widest) * _element_size(inputs.dtype)
    forward = inputs.micro_batch * inputs.seq_len * per_token
    recon = 3 * inputs.recon_micro_batch * inputs.seq_len * per_token
    return {"forward_plain": forward, "forward": forward, "statistics_pass": forward, "recon_eval": forward,
            "merge": 0, "recon_step": recon, "trainable_bytes": 0}


def _plan_for_tier(inputs: _Inputs, probe: ModelProbe, groups, tier: str, device_budget, host_budget,
                   traces: dict) -> MemoryPlan:
    cuda = inputs.device_type == "cuda"
    dev = "device" if cuda else "host"
    e, es = _element_size(inputs.dtype), _element_size(inputs.stored_dtype)
    stream_place = {"device": dev, "cpu": "host", "disk": "disk"}[tier]
    input_copy = stream_place != dev  # reads copy micro-batches to the compute device
    trace = _trace_cached(traces, input_copy, inputs, probe, groups)

    linears = {name: _in_out(probe.block.get_submodule(name)) for name in probe.layout.linear_names}
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
    phases.append(Phase("block load", held + [
        weights,
        Item("the block's checkpoint pages (memory-mapped, unmapped after the load)", block_stored, "host"),
        Item("block-0 only: pages of the modules before it, still mapped", probe.outside_numel * es, "host"),
    ]))
    base = held + [weights]
    if inputs.n_streams == 2:
        phases.append(Phase(f"dense pass (--micro-batch {inputs.micro_batch})", base + [
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
    phases.append(Phase(f"sparse pass (--micro-batch {inputs.micro_batch})", base + [
        mask_item, Item("forward activations + MSE", trace["forward"], dev), Item("allocator slack", slack(trace["forward"]), dev),
    ]))
    output_copy = cuda or inputs.stored_dtype != inputs.dtype
    phases.append(Phase("block write", held + [
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
    if cuda and tier == "device":
        notes.append("device tier: every stream checkpoint (--checkpoint-every) copies the streams to host memory")
    if inputs.pruner == "sparsegpt":
        notes.append("sparsegpt keeps one in x in float32 Gram matrix per linear, also for linears that read the "
                     f"same input (q/k/v), and all of a group at once ({human(stats)}); pruning one adds three "
                     "more in x in matrices (H, its Cholesky factor and inverse)")
    from pruners import get_pruner

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


def _kwargs_bytes(probe: ModelProbe, inputs: _Inputs) -> int:
    sizes = {1, inputs.micro_batch, inputs.recon_micro_batch, inputs.n_samples % inputs.micro_batch or inputs.micro_batch}
    total = 0
    for size in sizes:
        seen: set[int] = set()
        for tensor in tree_leaves(probe.kwargs.for_batch(size)):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage()._cdata not in seen:
                seen.add(tensor.untyped_storage()._cdata)
                total += tensor.untyped_storage().nbytes()
    return total


def _text_chars(source: str) -> int:
    path = Path(source).expanduser()
    if path.is_file():
        return path.stat().st_size
    return NAMED_TEXT_CHARS.get(source, 0)


def log_plan(plan: MemoryPlan) -> None:
    """Log the plan, one line per text line."""
    for line in plan.format().splitlines():
        logger.info("%s", line)


