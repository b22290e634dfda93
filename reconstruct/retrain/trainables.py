"""The method's trainable parameters of every block, resident in float32 across block loads.

A block's weights come and go (streamed), but its trainables stay: the first ``attach`` of a block
builds them with ``attach_method`` (adapters, bias/norm masters) and keeps the Parameter objects; every
later ``attach`` builds the wrappers again around the freshly loaded weights and puts the resident
Parameters in place of the new ones. The pruning mask of every linear is its zero pattern as loaded.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from pruners.layers import weight_as_out_in
from pruners.lowrank_function import Workspace
from reconstruct.methods.attach import MethodHandle, attach_method
from reconstruct.methods.spec import LOW_RANK_METHODS
from reconstruct.modelio.architecture import BlockLayout
from reconstruct.retrain.spec import RetrainSpec


def zero_pattern_mask(linear: nn.Module) -> Tensor:
    """The keep mask (True = weight survives) of a linear: its non-zero positions, (out, in) bool.

    ``weight.bool()`` is ``weight != 0`` (NaN counts as non-zero in both, -0.0 as zero), 6 times faster
    on a CPU here: it is computed at every load of a block.
    """
    return weight_as_out_in(linear).bool()


def zero_pattern_masks(linears: dict[str, nn.Module]) -> dict[str, Tensor]:
    """Keep masks of the linears: their non-zero positions (``zero_pattern_mask``)."""
    return {name: zero_pattern_mask(linear) for name, linear in linears.items()}


class ZeroPatternMasks(Mapping):
    """The linears' zero-pattern masks, each computed when first read (bias and norm methods read none
    until the merge)."""

    def __init__(self, linears: dict[str, nn.Module]) -> None:
        self.linears = linears
        self.computed: dict[str, Tensor] = {}

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.computed:
            self.computed[name] = zero_pattern_mask(self.linears[name])
        return self.computed[name]

    def __contains__(self, name: object) -> bool:
        return name in self.linears  # Mapping's default reads the item: it would compute the mask

    def __iter__(self):
        return iter(self.linears)

    def __len__(self) -> int:
        return len(self.linears)


def block_linears(block: nn.Module, layout: BlockLayout) -> dict[str, nn.Module]:
    """The block's prunable linears by qualified name, in the layout's order."""
    return {name: block.get_submodule(name) for name in layout.linear_names}


def block_seed(seed: int, index: int) -> int:
    """The adapter-init seed of block ``index`` (stable across runs, ranks and resumes)."""
    return seed * 1_000_003 + index


def _adopt(handle: MethodHandle, resident: list[nn.Parameter]) -> None:
    """Replace the handle's freshly built masters with ``resident`` ones (same order as built; the
    adapters' factors, first in that order, were passed to ``attach_method``)."""
    queue = iter(resident[2 * len(handle.wrappers):])
    for master in handle.masters.values():
        master.master = next(queue)
        master.module.__dict__[master.attr] = master.master.to(master.dtype)  # what the pre-hook injects


class ModelTrainables:
    """Every block's trainables under one method, float32, kept between block loads.

    Args:
        spec: the retraining job (method, rank, alpha, seed).
        layout: the model's block layout (linear names, bias flags).
    """

    def __init__(self, spec: RetrainSpec, layout: BlockLayout) -> None:
        self.spec = spec
        self.layout = layout
        self.by_block: dict[int, list[nn.Parameter]] = {}  # block index → its trainables, attach order
        self.added_biases: dict[int, set[str]] = {}  # block index → linears that got a new bias
        self.workspace = Workspace()  # the adapters' scratch, shared by every block (they run one at a time)

    def attach(self, index: int, block: nn.Module) -> MethodHandle:
        """Attach the method to loaded block ``index`` with its resident trainables; returns the handle."""
        linears = block_linears(block, self.layout)
        flagged = {name for names in self.layout.bias_flags.values() for name in names}
        bias_linears = {name for name, module in linears.items() if module.bias is not None or name in flagged}
        resident = self.by_block.get(index)
        factors = None
        if resident is not None and self.spec.method in LOW_RANK_METHODS:  # (A, B) per linear, first in the order
            factors = {name: (resident[2 * position], resident[2 * position + 1])
                       for position, name in enumerate(linears)}
        handle = attach_method(
            self.spec.method, block, linears, ZeroPatternMasks(linears), rank=self.spec.rank,
            alpha=self.spec.alpha, bias_linears=bias_linears, seed=block_seed(self.spec.seed, index),
            workspace=self.workspace, zero_pattern_masks=True, factors=factors,
        )
        if index in self.by_block:
            _adopt(handle, self.by_block[index])
        else:
            self.by_block[index] = handle.trainable_parameters()
            self.added_biases[index] = set(handle.added_biases)
        return handle

    def parameters(self) -> list[nn.Parameter]:
        """All trainables, block by block in index order (the optimizer's order)."""
        return [param for index in sorted(self.by_block) for param in self.by_block[index]]

    def numel(self) -> int:
        """Number of trainable scalars."""
        return sum(param.numel() for param in self.parameters())

    def state(self) -> dict[str, Tensor]:
        """A CPU copy of every trainable, named ``"<block>.<position>"`` (for checkpoints and the best step)."""
        return {f"{index}.{position}": param.detach().to("cpu", copy=True)
                for index, params in self.by_block.items() for position, param in enumerate(params)}

    @torch.no_grad()
    def load_state(self, state: dict[str, Tensor]) -> None:
        """Overwrite the trainables in place with a ``state()`` copy (a new version of each: adapters rebuild their weight)."""
        for index, params in self.by_block.items():
            for position, param in enumerate(params):
                param.copy_(state[f"{index}.{position}"])


def estimate_trainable_count(spec: RetrainSpec, layout: BlockLayout, blocks: nn.ModuleList) -> int:
    """Trainable scalars of the method from the skeleton's shapes (nothing loaded; new biases not counted).

    Low-rank methods: ``r (in + out)`` per linear; the others: every 1-D tensor of the blocks (an upper bound).
    """
    if spec.method in ("masklora", "scalelora", "lora"):
        per_block = sum(spec.rank * sum(blocks[0].get_submodule(name).weight.shape) for name in layout.linear_names)
        return per_block * len(blocks)
    return sum(param.numel() for param in blocks.parameters() if param.dim() == 1)
