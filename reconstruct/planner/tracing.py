"""Traces of one block on ``meta``: the peak bytes of its forward, statistics and reconstruction passes."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pruners import get_pruner
from calib.hooks import feeding_statistics, group_by_shared_input
from pruners.lowrank_function import Workspace
from reconstruct.methods.adapters import LowRankLinear
from reconstruct.methods.bias_norm import bias_masters, norm_masters
from reconstruct.methods.spec import LOW_RANK_METHODS
from reconstruct.planner.probe import ModelProbe, in_out


class _LiveBytes(TorchDispatchMode):
    """Adds up the bytes of storages created inside the mode and still alive, op by op; keeps the peak.

    Freed storages are dropped from the count lazily, only when the count would pass the peak: the lazy
    count is never below the exact one, so while it stays at or under the peak the exact count does too,
    and when it passes, the freed storages are dropped and the exact count decides. The peak is the one
    an op-by-op exact count gives, without scanning every live storage at every op (a block of 128
    experts holds hundreds of live tensors over thousands of ops).
    """

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
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key in inputs:  # an in-place result is not new
                    continue
                known = self.live.get(key)
                if known is not None and not known[0].expired():  # a view of a live storage is not new
                    continue
                if known is not None:  # the address of a freed storage, reused
                    self.current -= known[1]
                self.live[key] = (self._weak(storage), storage.nbytes())
                self.current += storage.nbytes()
        if self.current > self.peak:
            self._drop_freed()
            self.peak = max(self.peak, self.current)
        return out

    def _drop_freed(self) -> None:
        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]


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


def _forward(block, arguments):
    return lambda hidden: arguments.run(block, 0, hidden)


def trace_block(probe: ModelProbe, dtype: torch.dtype, seq_len: int, micro_batch: int, recon_micro_batch: int,
                input_copy: bool, pruner: str, groups: list[list[str]], recon) -> dict[str, int]:
    """Traced peaks of one block's passes (meta, exact shapes): forward, statistics, reconstruction."""
    block = probe.block
    forward = _forward(block, probe.arguments)
    hidden = probe.hidden
    meta = torch.device("meta")

    def batch(size: int) -> torch.Tensor:
        return torch.empty(size, seq_len, hidden, dtype=dtype, device=meta)

    outside = {size: batch(size) for size in {micro_batch, recon_micro_batch}}  # views of a device stream: no new memory

    def read(size: int) -> torch.Tensor:
        return batch(size) if input_copy else outside[size]

    def compare_pass(size: int):  # loop.pipeline.run_stream with compare_with / methods.evaluate_mse
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
                stats = {name: pruner_obj.new_stats(in_out(linears[name])[1], meta) for name in group}
                with feeding_statistics({name: linears[name] for name in group}, stats):
                    stats_pass = max(stats_pass, trace_peak(lambda: forward(read(micro_batch))))
        result["statistics_pass"] = stats_pass
    if recon is None or recon.method == "none":
        return result
    trainable, wrappers, undo = _attach_on_meta(block, linears, recon, probe.layout)
    try:
        with torch.no_grad():
            result["recon_eval"] = trace_peak(lambda: compare_pass(micro_batch))  # MSE before, at --batch-size
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


def _attach_on_meta(block, linears, recon, layout):
    """The method's trainable state on the meta block, as ``attach_method`` builds it (no data checks)."""
    wrappers, masters = [], {}
    swapped = []
    if recon.method in LOW_RANK_METHODS:
        workspace = Workspace()  # one per block, as attach_method shares it
        for name, linear in linears.items():
            keep = torch.empty(in_out(linear), dtype=torch.bool, device="meta")  # (out, in)
            wrapper = LowRankLinear(linear, keep, kind=recon.method, rank=recon.rank, alpha=recon.alpha, seed=0,
                                    workspace=workspace)
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
            getattr(parent, attr).forget_weight()
            setattr(parent, attr, linear)
        for master in masters.values():
            master.restore(None)
        for param in trainable:
            param.grad = None

    return trainable, wrappers, undo


def sequential_groups(probe: ModelProbe, seq_len: int) -> list[list[str]]:
    """Sub-layer groups as the engine finds them (linears reading the same tensor), on the meta block."""
    linears = {name: probe.block.get_submodule(name) for name in probe.layout.linear_names}
    record: list = []
    handles = []
    try:
        for name, module in linears.items():
            def hook(module, args, name=name):
                record.append((name, id(args[0]), tuple(args[0].shape)))  # meta tensors have no data pointer
            handles.append(module.register_forward_pre_hook(hook))
        with torch.no_grad(), _FusedAttention():
            out = _forward(probe.block, probe.arguments)(
                torch.empty(1, seq_len, probe.hidden, dtype=next(probe.block.parameters()).dtype, device="meta"))
            del out
    finally:
        for handle in handles:
            handle.remove()
    return group_by_shared_input(record)
