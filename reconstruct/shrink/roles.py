"""Which linears of a block hold heads and channels: ``pruners.structured``'s discovery, on a real forward.

The sub-layer order (``[[q, k, v], [o], [gate, up], [down]]``) is read from one forward of block 0
on four tokens (inputs captured exactly as the engine captures them), so no model names are
hard-coded here. Memory: the modules outside the blocks and block 0, released afterwards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers.pytorch_utils import Conv1D

from pruners.structured import ChannelGroups, HeadGroups, find_channel_groups, find_head_groups
from reconstruct.modelio.architecture import weight_as_out_in
from reconstruct.modelio.loaded import LoadedModel
from calib.hooks import group_by_shared_input, recording_linear_inputs

logger = logging.getLogger(__name__)

PROBE_TOKENS = 4  # tokens of the one forward that reveals the call order


@dataclass(frozen=True)
class BlockRoles:
    """The structured groups of a block (the same in every block)."""

    heads: HeadGroups | None  # None: separate q/k/v projections not found (e.g. GPT-2's fused c_attn)
    heads_problem: str  # why ``heads`` is None
    channels: ChannelGroups | None
    channels_problem: str
    stored_in_out: frozenset[str]  # linears stored (in, out) (GPT-2 Conv1D)


def probe_call_order(loaded: LoadedModel) -> list[list[str]]:
    """Block 0's linears grouped by shared input, in execution order, from one small forward."""
    tokens = (torch.arange(PROBE_TOKENS) % loaded.config.vocab_size).unsqueeze(0)  # (1, T)
    captured: dict = {}
    arguments = loaded.capture_block_inputs(tokens, 1, lambda rows, hidden: captured.update(hidden=hidden))
    record: list = []
    with loaded.visiting_block(0) as block:
        linears = {name: block.get_submodule(name) for name in loaded.layout.linear_names}
        with torch.no_grad(), recording_linear_inputs(linears, record):
            arguments.run(block, 0, captured["hidden"])  # (1, T, H)
    return group_by_shared_input(record)


def find_roles(loaded: LoadedModel) -> BlockRoles:
    """Head and channel groups of the model's blocks (see the module docstring)."""
    order = probe_call_order(loaded)
    block = loaded.blocks[0]
    shapes = {name: tuple(weight_as_out_in(block.get_submodule(name)).shape) for name in loaded.layout.linear_names}
    heads, heads_problem = None, ""
    try:
        heads = find_head_groups(order, shapes, loaded.config)
    except ValueError as error:
        heads_problem = str(error)
    channels, channels_problem = None, ""
    try:
        channels = find_channel_groups(order, shapes)
    except ValueError as error:
        channels_problem = str(error)
    conv = frozenset(name for name in loaded.layout.linear_names if isinstance(block.get_submodule(name), Conv1D))
    logger.info("shrink roles: heads %s, channels %s", heads, channels)
    return BlockRoles(heads, heads_problem, channels, channels_problem, conv)


def block_group_counts(loaded: LoadedModel, roles: BlockRoles) -> list[dict[str, int]]:
    """Heads, key/value heads and MLP channels of every block, read from the stored shapes (headers only)."""

    counts = []
    for index in range(loaded.layout.n_blocks):
        block: dict[str, int] = {}
        if roles.heads is not None:
            heads = roles.heads
            block["heads"] = output_weight(loaded, roles, index, heads.query).shape[0] // heads.head_dim
            block["kv_heads"] = output_weight(loaded, roles, index, heads.key_value[0]).shape[0] // heads.head_dim
        if roles.channels is not None:
            block["channels"] = output_weight(loaded, roles, index, roles.channels.down).shape[1]
        loaded.reader.close()
        counts.append(block)
    return counts


def output_weight(loaded: LoadedModel, roles: BlockRoles, index: int, name: str) -> torch.Tensor:
    """Block ``index``'s linear ``name`` as stored in the checkpoint, read as ``(out, in)``."""
    key = loaded.key_map[f"{loaded.layout.block_prefix(index)}{name}.weight"]
    weight = loaded.reader.read(key)
    return weight.t() if name in roles.stored_in_out else weight
