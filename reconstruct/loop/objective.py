"""What reconstruction matches: whole block, attention and MLP separately, or each linear.

A *unit* is a piece of the block whose output is compared with the dense model's: the block,
its attention and MLP sub-layers (``--granularity sublayer``), or each linear (``linear``). On
the pruned path every unit's input is detached, so a unit's parameters learn only from its own
error, exactly as if each unit were reconstructed on its own, but in one forward pass.

A sub-layer unit starts at the normalisation module that feeds it (:func:`build_units`): the
attention unit of a pre-norm block is its residual branch ``input_layernorm → self_attn``, not
``self_attn`` alone. Otherwise the norms sit outside every unit, get no gradient, and ``ln`` /
``bias-ln`` cannot rescale a sub-layer's input, which is what repairs a block whose dense output
carries a few huge activations (SmolLM2's block 12 at 70%: perplexity 1079 → 264, docs/benchmarks.md).
A linear unit stays the linear alone: its norm is shared with its siblings (q, k, v), and training
it on their summed errors made SmolLM2 worse (738 → 1232).

Targets are the dense block's unit outputs, computed on the fly by a dense copy of the block:
on the dense stream (``--target dense``, PERP's objective) or on the pruned path's own unit
inputs (``--target local``: the dense unit applied to what the pruned unit actually receives).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from calib.activations import ActivationStream
from reconstruct.methods.bias_norm import find_norms
from reconstruct.methods.spec import GRANULARITIES, TARGETS
ATTENTION_MARKERS = ("attn", "attention")


@dataclass(frozen=True)
class Unit:
    """A reconstructed piece: the modules whose inputs start it and the module whose output ends it."""

    name: str
    entries: tuple[str, ...]  # module names relative to the block ("" = the block itself)
    exit: str


def _common_parent(names: list[str]) -> str:
    parts = [name.split(".")[:-1] for name in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def discover_units(granularity: str, linear_call_order: list[list[str]]) -> list[Unit]:
    """The units for ``granularity``, from the block's linears grouped in execution order.

    Args:
        granularity: ``block``, ``sublayer`` or ``linear``.
        linear_call_order: groups of linears that read the same input, in call order
            (``calib.hooks.group_by_shared_input``).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"--granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if granularity == "block":
        return [Unit("block", ("",), "")]
    flat = [name for group in linear_call_order for name in group]
    if granularity == "linear":
        return [Unit(name, (name,), name) for name in flat]
    attention = [g for g in linear_call_order if any(m in g[0].lower() for m in ATTENTION_MARKERS)]
    mlp = [g for g in linear_call_order if g not in attention]
    if not attention or not mlp:
        raise ValueError("--granularity sublayer: could not tell this block's attention linears from its MLP's")
    units = []
    for label, groups in (("attention", attention), ("mlp", mlp)):
        names = [name for group in groups for name in group]
        parent = _common_parent(names)
        if parent:  # a module holds the whole sub-layer (self_attn, mlp)
            units.append(Unit(label, (parent,), parent))
        else:  # linears sit directly in the block (OPT's fc1/fc2): from the first group to the last linear
            units.append(Unit(label, tuple(groups[0]), groups[-1][-1]))
    return units


def build_units(granularity: str, linear_call_order: list[list[str]], block: nn.Module, run_block: Callable,
                sample: torch.Tensor) -> list[Unit]:
    """The units for ``granularity``; sub-layer units start at their input norms (module docstring).

    Args:
        granularity: ``block``, ``sublayer`` or ``linear``.
        linear_call_order: the block's linears grouped by shared input, in call order.
        block: a block of the model (one forward runs on it when ``granularity`` is ``sublayer``).
        run_block: ``run_block(module, x (b, T, H)) → (b, T, H)``.
        sample: ``(b, T, H)`` block input for that forward.
    """
    units = discover_units(granularity, linear_call_order)
    if granularity != "sublayer":
        return units
    return starting_at_input_norms(units, block, run_block, sample)


@torch.no_grad()
def starting_at_input_norms(units: list[Unit], block: nn.Module, run_block: Callable, sample: torch.Tensor) -> list[Unit]:
    """``units`` with each entry moved back to the normalisation module whose output it reads.

    Found by one forward of ``block`` on ``sample`` (b, T, H): an entry starts at a norm when the
    tensor it receives *is* that norm's output (same storage and shape), so nothing depends on
    module names. q/k/v units that read one norm all start at it. Entries fed by anything else (the
    block's input, o_proj's attention output) are left as they are.
    """
    norms = find_norms(block)
    entries = {entry for unit in units for entry in unit.entries if entry != ""}
    if not norms or not entries:
        return units
    norm_outputs: dict[tuple, str] = {}
    entry_inputs: dict[str, tuple] = {}
    alive: list[torch.Tensor] = []  # freed tensors' storage could be reused and match by accident
    handles = []
    try:
        for name, norm in norms.items():

            def hook(module, args, output, name=name):
                tensor = _first_tensor(output)
                alive.append(tensor)
                norm_outputs.setdefault((tensor.data_ptr(), tuple(tensor.shape)), name)

            handles.append(norm.register_forward_hook(hook))
        for entry in entries:

            def pre_hook(module, args, kwargs, entry=entry):
                tensor = _get_input(args, kwargs)
                alive.append(tensor)
                entry_inputs.setdefault(entry, (tensor.data_ptr(), tuple(tensor.shape)))

            handles.append(block.get_submodule(entry).register_forward_pre_hook(pre_hook, with_kwargs=True))
        run_block(block, sample)
    finally:
        for handle in handles:
            handle.remove()
        alive.clear()
    start = {entry: norm_outputs[key] for entry, key in entry_inputs.items() if key in norm_outputs}
    moved = []
    for unit in units:
        new_entries = tuple(dict.fromkeys(start.get(entry, entry) for entry in unit.entries))
        moved.append(Unit(unit.name, new_entries, unit.exit))
    return moved


def _first_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_input(args, kwargs, value):
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


def _get_input(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def _unit_hooks(block: nn.Module, units: list[Unit], outputs: dict, entry_inputs: dict | None,
                substitute: dict | None, detach: bool):
    """Record unit outputs; optionally record, detach or substitute unit inputs."""
    handles = []
    try:
        for unit in units:
            for entry in unit.entries:
                if entry == "":
                    continue  # the block's own input is handled by the caller

                def pre_hook(module, args, kwargs, key=(unit.name, entry)):
                    value = _get_input(args, kwargs)
                    if substitute is not None:
                        value = substitute[key]
                    elif detach:
                        value = value.detach()
                    if entry_inputs is not None:
                        entry_inputs[key] = value.detach()
                    return _replace_input(args, kwargs, value)

                handles.append(block.get_submodule(entry).register_forward_pre_hook(pre_hook, with_kwargs=True))
            if unit.exit != "":

                def hook(module, args, output, name=unit.name):
                    outputs[name] = _first_tensor(output)

                handles.append(block.get_submodule(unit.exit).register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


class UnitObjective:
    """``forward`` and ``targets`` for ``train_reconstruction`` when the loss is taken at units.

    ``forward(x)`` runs the pruned block and returns its unit outputs concatenated along the last
    dimension, (b, T, sum of unit widths). ``targets.read(indices)`` returns the dense copy's unit
    outputs for the same samples, in the same layout.
    """

    def __init__(self, block: nn.Module, dense_block: nn.Module, units: list[Unit],
                 run_block: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                 sparse: ActivationStream, dense: ActivationStream, target: str):
        if target not in TARGETS:
            raise ValueError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
        self.block, self.dense_block, self.units = block, dense_block, units
        self.run_block = run_block  # run_block(module, x (b, T, H)) → (b, T, H)
        self.sparse, self.dense, self.target = sparse, dense, target
        self.n_samples = sparse.n_samples

    def _collect(self, block: nn.Module, x: torch.Tensor, entry_inputs=None, substitute=None, detach=False):
        outputs: dict[str, torch.Tensor] = {}
        with _unit_hooks(block, self.units, outputs, entry_inputs, substitute, detach):
            block_output = self.run_block(block, x)
        if any(unit.exit == "" for unit in self.units):
            outputs["block"] = block_output
        batch = x.shape[0]  # some blocks flatten tokens inside (OPT's MLP sees (b*T, H)): restore (b, T, D)
        parts = [outputs[unit.name].reshape(batch, -1, outputs[unit.name].shape[-1]) for unit in self.units]
        return torch.cat(parts, dim=-1)  # (b, T, sum of unit widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pruned block's unit outputs on ``x``, with every unit input detached."""
        return self._collect(self.block, x, detach=True)

    @torch.no_grad()
    def read(self, indices) -> torch.Tensor:
        """Dense unit outputs for samples ``indices`` (the ``targets`` stream interface)."""
        if self.target == "dense":
            return self._collect(self.dense_block, self.dense.read(indices))
        sparse_input = self.sparse.read(indices)
        entry_inputs: dict = {}
        self._collect(self.block, sparse_input, entry_inputs=entry_inputs)  # what the pruned units receive
        return self._collect(self.dense_block, sparse_input, substitute=entry_inputs)
