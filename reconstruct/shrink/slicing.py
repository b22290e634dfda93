"""Delete removed heads and channels from a block's tensors: smaller dense matrices, same function.

Heads: the query projection's rows and the output projection's columns of a removed head, and the
key/value rows of a key/value head none of whose query heads is left. Channels: the rows of every
up projection (gate and up / fc1 / c_fc) and the down projection's column. Biases of deleted rows go
with them: a deleted channel's up/gate bias only reached the output through the down projection's
zero column, and a deleted head's q/k/v biases only through the output projection's zero columns,
so dropping them is exact. The output and down projections keep their own biases.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reconstruct.shrink.roles import BlockRoles

Keep = tuple[Tensor | None, Tensor | None]  # (kept output rows, kept input columns); None = all


def _kept(n_groups: int, removed: list[int], group_size: int) -> Tensor:
    """Sorted indices of the rows (or columns) of the groups not in ``removed``."""
    keep = torch.ones(n_groups, dtype=torch.bool)
    keep[removed] = False
    return torch.nonzero(keep.repeat_interleave(group_size)).flatten()


def keep_indices(roles: BlockRoles, removed: dict[str, list[int]]) -> dict[str, Keep]:
    """Linear name -> which output rows and input columns it keeps, for one block's ``removed`` groups."""
    keep: dict[str, Keep] = {}
    if removed.get("heads"):
        heads = roles.heads
        query = _kept(heads.num_heads, removed["heads"], heads.head_dim)  # (kept heads * head_dim,)
        keep[heads.query] = (query, None)
        keep[heads.output] = (None, query)
        kv = _kept(heads.num_kv_heads, removed.get("kv_heads", []), heads.head_dim)
        for name in heads.key_value:
            keep[name] = (kv, None)
    if removed.get("channels"):
        channels = roles.channels
        kept = _kept(channels.channels, removed["channels"], 1)
        for name in channels.up:
            keep[name] = (kept, None)
        keep[channels.down] = (keep.get(channels.down, (None, None))[0], kept)
    return keep


def slice_parameter(tensor: Tensor, param: str, keep: Keep, stored_in_out: bool) -> Tensor:
    """One linear's ``weight`` or ``bias`` as stored, with the deleted rows and columns left out.

    Args:
        tensor: the stored tensor: weight ``(out, in)`` (``(in, out)`` when ``stored_in_out``) or bias ``(out,)``.
        param: ``"weight"`` or ``"bias"``.
        keep: from :func:`keep_indices`.
        stored_in_out: GPT-2's ``Conv1D`` layout.
    """
    rows, columns = keep
    if param == "bias":
        return tensor.index_select(0, rows).contiguous() if rows is not None else tensor
    out_dim, in_dim = (1, 0) if stored_in_out else (0, 1)
    if rows is not None:
        tensor = tensor.index_select(out_dim, rows)
    if columns is not None:
        tensor = tensor.index_select(in_dim, columns)
    return tensor.contiguous()


def shrink_block_tensors(tensors: dict[str, Tensor], prefix: str, roles: BlockRoles,
                         removed: dict[str, list[int]]) -> dict[str, Tensor]:
    """A block's stored tensors (checkpoint name -> tensor), shrunk.

    Args:
        tensors: ``{model key: tensor}`` for keys under ``prefix`` (e.g. ``model.layers.3.``).
        prefix: the block's state-dict prefix.
        roles: the block's head and channel groups.
        removed: the block's removed groups (``ShrinkPlan.removed[i]``).
    """
    keep = keep_indices(roles, removed)
    shrunk: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        linear, _, param = key[len(prefix):].rpartition(".")
        if linear in keep and param in ("weight", "bias"):
            tensor = slice_parameter(tensor, param, keep[linear], linear in roles.stored_in_out)
        shrunk[key] = tensor
    return shrunk
