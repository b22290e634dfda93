"""Structured pruning: whole attention heads (``--pattern heads``) or MLP channels (``--pattern channels``).

A structured group spans several linears of a block, and every weight of a removed group is zeroed:

- head ``h``: rows ``h*d:(h+1)*d`` of the query projection and columns ``h*d:(h+1)*d`` of the output
  projection (``d`` = head_dim). With grouped-query attention (``num_key_value_heads < num_heads``),
  query head ``h`` reads key/value head ``h // (num_heads / num_key_value_heads)`` (transformers'
  ``repeat_kv``). We prune *query* heads, the unit ``--sparsity`` counts, and zero a key/value head
  (its rows of k and v) only when every query head sharing it is removed: the model stays exactly
  equivalent to one with those heads cut out, and "2 of 9 heads" means 2 of the 9 query heads even
  when 3 of them share one k/v head.
- channel ``c``: row ``c`` of every up-projection (``gate_proj`` and ``up_proj``; OPT ``fc1``; GPT-2
  ``c_fc``) and column ``c`` of the down-projection (``down_proj``; ``fc2``; ``mlp.c_proj``).

Biases are left alone: once the output projection's columns of a head (or the down projection's
column of a channel) are zero, nothing the group computes reaches the block's output, whatever
its q/k/v or up biases hold.

Which linears play which role is found without a per-model table: the sub-layer order
(``calib.hooks.group_by_shared_input``: ``[[q, k, v], [o], [gate, up], [down]]``, OPT
``[[q, k, v], [out], [fc1], [fc2]]``) split into attention and MLP by module name (``attn``,
``attention``), the head geometry from the config (``num_attention_heads``, ``num_key_value_heads``,
``head_dim`` or hidden / heads), and the query projection among q/k/v by its output size. A fused
q/k/v projection (GPT-2's ``c_attn``, Falcon's ``query_key_value``) is refused for heads.

Scoring: each pruner gives element importance (``Pruner.importance``: magnitude ``|W|``, Wanda
``|W| * ||X_j||``, SparseGPT the OBS saliency ``w^2 / [H^-1]_jj`` without its update step, LoRAPrune
its LoRA-guided importance). A group's score sums its weights' importance per linear; each linear's
vector of group scores is divided by its L2 norm (LoRAPrune's per-layer normalisation, so that no
linear dominates by scale), and the linears' vectors are added (a k/v head's score is shared equally
by the query heads that read it). The lowest-scoring groups are removed.

Counts: ``--sparsity`` is the fraction of heads (or channels) removed in every block, rounded to the
nearest whole group (halves up): ``--sparsity 0.2222`` with 9 heads removes 2, 0.2 of 1536 channels
removes 307. Removing every head or every channel is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pruners.pattern import CHANNELS, HEADS, SparsityPattern

ATTENTION_MARKERS = ("attn", "attention")
NORM_EPS = 1e-12  # added to a linear's score norm before dividing (an all-zero linear stays zero)


def structured_count(total: int, sparsity: float) -> int:
    """Groups removed of ``total`` at ``sparsity``: the nearest whole number, halves up."""
    return int(math.floor(total * sparsity + 0.5))


@dataclass(frozen=True)
class HeadGroups:
    """Where a block's attention heads live."""

    query: str  # linear whose output rows are query heads
    key_value: tuple[str, ...]  # linears whose output rows are key/value heads
    output: str  # linear whose input columns are query heads
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (== num_heads without GQA)
    head_dim: int

    @property
    def queries_per_kv(self) -> int:
        """Query heads sharing one key/value head."""
        return self.num_heads // self.num_kv_heads

    @property
    def linears(self) -> tuple[str, ...]:
        return (self.query, *self.key_value, self.output)


@dataclass(frozen=True)
class ChannelGroups:
    """Where a block's MLP intermediate channels live."""

    up: tuple[str, ...]  # linears whose output rows are channels (gate and up / fc1)
    down: str  # linear whose input columns are channels (down / fc2)
    channels: int

    @property
    def linears(self) -> tuple[str, ...]:
        return (*self.up, self.down)


def attention_geometry(config) -> tuple[int, int, int]:
    """``(num_heads, num_kv_heads, head_dim)`` from a transformers config.

    Raises:
        ValueError: the config does not say how many heads there are, or the counts do not divide.
    """
    num_heads = getattr(config, "num_attention_heads", None)
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(
            f"--pattern heads: the {getattr(config, 'model_type', '?')} config has no num_attention_heads; "
            "use --pattern channels or unstructured"
        )
    num_kv = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // num_heads
    if num_heads % num_kv:
        raise ValueError(f"--pattern heads: {num_heads} query heads do not split into {num_kv} key/value groups")
    return num_heads, int(num_kv), int(head_dim)


def is_attention(name: str) -> bool:
    """True for a linear whose qualified name says it belongs to attention."""
    return any(marker in name.lower() for marker in ATTENTION_MARKERS)


def split_sublayers(call_order: list[list[str]]) -> tuple[list[list[str]], list[list[str]]]:
    """The call-order groups of the attention sub-layer and of the MLP, each in call order."""
    attention = [group for group in call_order if is_attention(group[0])]
    mlp = [group for group in call_order if not is_attention(group[0])]
    return attention, mlp


def find_head_groups(call_order: list[list[str]], shapes: dict[str, tuple[int, int]], config) -> HeadGroups:
    """Assign the q/k/v and output roles for ``--pattern heads``.

    Args:
        call_order: the block's linears grouped by shared input, in execution order.
        shapes: linear name -> ``(out, in)``.
        config: the model's transformers config.

    Raises:
        ValueError: fused q/k/v projections, or linears whose shapes do not match the head geometry.
    """
    num_heads, num_kv, head_dim = attention_geometry(config)
    attention, _ = split_sublayers(call_order)
    if attention and len(attention[0]) == 1:
        fused = attention[0][0]
        if shapes[fused][0] >= 2 * num_heads * head_dim:
            raise ValueError(
                f"--pattern heads: {fused} computes queries, keys and values in one fused linear of shape "
                f"{shapes[fused]}; heads of fused projections (GPT-2's c_attn) are not supported; "
                "use --pattern channels or unstructured"
            )
    if len(attention) != 2 or len(attention[0]) != 3 or len(attention[1]) != 1:
        raise ValueError(
            f"--pattern heads: expected attention linears grouped as [[q, k, v], [o]], found {attention}; "
            "use --pattern channels or unstructured"
        )
    qkv, (output,) = attention
    q_rows, kv_rows = num_heads * head_dim, num_kv * head_dim
    if num_kv == num_heads:
        query, key_value = qkv[0], tuple(qkv[1:])
    else:
        queries = [name for name in qkv if shapes[name][0] == q_rows]
        if len(queries) != 1:
            raise ValueError(f"--pattern heads: none or several of {qkv} have the query size {q_rows}")
        query = queries[0]
        key_value = tuple(name for name in qkv if name != query)
    for name in key_value:
        if shapes[name][0] != kv_rows:
            raise ValueError(f"--pattern heads: {name} has {shapes[name][0]} outputs, expected {num_kv} heads x {head_dim}")
    if shapes[query][0] != q_rows or shapes[output][1] != q_rows:
        raise ValueError(
            f"--pattern heads: {query} outputs {shapes[query][0]} and {output} takes {shapes[output][1]} features, "
            f"expected {num_heads} heads x {head_dim}"
        )
    return HeadGroups(query, key_value, output, num_heads, num_kv, head_dim)


def find_channel_groups(call_order: list[list[str]], shapes: dict[str, tuple[int, int]]) -> ChannelGroups:
    """Assign the up and down roles for ``--pattern channels``.

    Raises:
        ValueError: an MLP that is not ``[[up...], [down]]`` with matching sizes.
    """
    _, mlp = split_sublayers(call_order)
    if len(mlp) != 2 or len(mlp[1]) != 1:
        raise ValueError(
            f"--pattern channels: expected MLP linears grouped as [[gate, up], [down]] or [[fc1], [fc2]], found {mlp}"
        )
    up, (down,) = mlp
    channels = shapes[down][1]
    for name in up:
        if shapes[name][0] != channels:
            raise ValueError(f"--pattern channels: {name} has {shapes[name][0]} outputs but {down} takes {channels}")
    return ChannelGroups(tuple(up), down, channels)


def find_groups(pattern: SparsityPattern, call_order: list[list[str]], shapes: dict[str, tuple[int, int]],
                config) -> HeadGroups | ChannelGroups:
    """The structure ``pattern`` prunes in a block (heads or channels)."""
    if pattern.kind == HEADS:
        return find_head_groups(call_order, shapes, config)
    if pattern.kind == CHANNELS:
        return find_channel_groups(call_order, shapes)
    raise ValueError(f"not a structured pattern: {pattern.kind!r}")


# --------------------------------------------------------------------------- scores
def row_group_sums(scores: Tensor, n_groups: int) -> Tensor:
    """``(out, in)`` -> ``(n_groups,)``: sums over consecutive equal blocks of rows."""
    out_features, in_features = scores.shape
    return scores.float().reshape(n_groups, out_features // n_groups, in_features).sum(dim=(1, 2))


def column_group_sums(scores: Tensor, n_groups: int) -> Tensor:
    """``(out, in)`` -> ``(n_groups,)``: sums over consecutive equal blocks of columns."""
    out_features, in_features = scores.shape
    return scores.float().reshape(out_features, n_groups, in_features // n_groups).sum(dim=(0, 2))


def _normalized(vector: Tensor) -> Tensor:
    return vector / (vector.norm() + NORM_EPS)


def head_scores(groups: HeadGroups, importance: dict[str, Tensor]) -> Tensor:
    """``(num_heads,)`` float32 score of each query head (see the module docstring)."""
    scores = _normalized(row_group_sums(importance[groups.query], groups.num_heads))
    scores = scores + _normalized(column_group_sums(importance[groups.output], groups.num_heads))
    share = groups.queries_per_kv
    for name in groups.key_value:
        kv = _normalized(row_group_sums(importance[name], groups.num_kv_heads))  # (num_kv,)
        scores = scores + kv.repeat_interleave(share) / share
    return scores


def channel_scores(groups: ChannelGroups, importance: dict[str, Tensor]) -> Tensor:
    """``(channels,)`` float32 score of each MLP channel (see the module docstring)."""
    scores = _normalized(column_group_sums(importance[groups.down], groups.channels))
    for name in groups.up:
        scores = scores + _normalized(row_group_sums(importance[name], groups.channels))
    return scores


def select_removed(scores: Tensor, count: int, already_removed: Tensor | None = None) -> Tensor:
    """Remove the ``count`` lowest-scoring groups; groups removed earlier go first.

    Args:
        scores: ``(n,)`` group scores, higher = more important.
        count: groups to remove, ``0 <= count < n``.
        already_removed: optional ``(n,)`` bool groups an earlier cycle removed.

    Returns:
        ``(n,)`` bool, True = the group is removed; a superset of ``already_removed``.
    """
    n = scores.shape[0]
    if not 0 <= count < n:
        raise ValueError(f"--sparsity removes {count} of {n} groups in a block; it must leave at least one")
    ranked = scores.float()
    if already_removed is not None:
        if int(already_removed.sum()) > count:
            raise ValueError(f"an earlier pruning cycle removed {int(already_removed.sum())} groups, more than {count}")
        ranked = ranked.masked_fill(already_removed.to(ranked.device), float("-inf"))
    removed = torch.zeros(n, dtype=torch.bool, device=scores.device)
    removed[torch.argsort(ranked, stable=True)[:count]] = True
    return removed


# --------------------------------------------------------------------------- masks
def _row_mask(keep_groups: Tensor, group_size: int, shape: tuple[int, int]) -> Tensor:
    return keep_groups.repeat_interleave(group_size).unsqueeze(1).expand(shape).clone()  # (out, in)


def _column_mask(keep_groups: Tensor, group_size: int, shape: tuple[int, int]) -> Tensor:
    return keep_groups.repeat_interleave(group_size).unsqueeze(0).expand(shape).clone()  # (out, in)


def kv_heads_removed(groups: HeadGroups, removed_heads: Tensor) -> Tensor:
    """``(num_kv,)`` bool: key/value heads all of whose query heads are removed."""
    return removed_heads.reshape(groups.num_kv_heads, groups.queries_per_kv).all(dim=1)


def structured_keep_masks(groups: HeadGroups | ChannelGroups, removed: Tensor,
                          shapes: dict[str, tuple[int, int]]) -> dict[str, Tensor]:
    """``(out, in)`` bool keep masks of the group's linears for ``removed`` (``(n,)`` bool) groups."""
    keep = ~removed
    if isinstance(groups, HeadGroups):
        keep_kv = ~kv_heads_removed(groups, removed)
        masks = {groups.query: _row_mask(keep, groups.head_dim, shapes[groups.query]),
                 groups.output: _column_mask(keep, groups.head_dim, shapes[groups.output])}
        for name in groups.key_value:
            masks[name] = _row_mask(keep_kv, groups.head_dim, shapes[name])
        return masks
    masks = {name: _row_mask(keep, 1, shapes[name]) for name in groups.up}
    masks[groups.down] = _column_mask(keep, 1, shapes[groups.down])
    return masks


def removed_groups(groups: HeadGroups | ChannelGroups, keep_masks: dict[str, Tensor]) -> Tensor | None:
    """``(n,)`` bool groups whose output-side columns are all pruned in ``keep_masks``; None if absent."""
    if isinstance(groups, HeadGroups):
        mask = keep_masks.get(groups.output)
        n = groups.num_heads
    else:
        mask = keep_masks.get(groups.down)
        n = groups.channels
    if mask is None:
        return None
    return ~column_group_sums(mask.float(), n).bool()


def select_removed_per_kv_group(scores: Tensor, count: int, num_kv_heads: int,
                                already_removed: Tensor | None = None) -> Tensor:
    """:func:`select_removed` inside every key/value group: ``count / num_kv_heads`` query heads from each.

    Keeps a grouped-query layout expressible by a config after the heads are deleted
    (``reconstruct shrink``: every key/value head keeps the same number of query heads).

    Raises:
        ValueError: ``count`` is not a multiple of ``num_kv_heads``.
    """
    if count % num_kv_heads:
        raise ValueError(f"--shrink with --pattern heads removes {count} query heads, not a multiple of the "
                         f"{num_kv_heads} key/value groups; choose --sparsity so that it is")
    per_group = scores.reshape(num_kv_heads, -1)  # (num_kv, queries_per_kv)
    earlier = already_removed.reshape(num_kv_heads, -1) if already_removed is not None else [None] * num_kv_heads
    return torch.cat([select_removed(per_group[g], count // num_kv_heads, earlier[g]) for g in range(num_kv_heads)])


def select_structured(
    pattern: SparsityPattern,
    groups: HeadGroups | ChannelGroups,
    importance: dict[str, Tensor],
    previous: dict[str, Tensor] | None = None,
    per_kv_group: bool = False,
) -> tuple[dict[str, Tensor], dict[str, list[int]]]:
    """Choose the heads or channels to remove and the keep masks that remove them.

    Args:
        pattern: a ``heads`` or ``channels`` pattern; its sparsity is the fraction of groups removed.
        groups: from :func:`find_groups`.
        importance: linear name -> ``(out, in)`` element importance (``Pruner.importance``).
        previous: keep masks of an earlier cycle (the result removes a superset of its groups).
        per_kv_group: heads with grouped-query attention: remove the same number of query heads
            from every key/value group (``run --shrink``).

    Returns:
        ``(keep_masks, removed)``: ``(out, in)`` bool masks for ``groups.linears``, and the removed
        indices by kind: ``{"heads": [...], "kv_heads": [...]}`` or ``{"channels": [...]}``.
    """
    shapes = {name: tuple(importance[name].shape) for name in groups.linears}
    if isinstance(groups, HeadGroups):
        scores, total = head_scores(groups, importance), groups.num_heads
    else:
        scores, total = channel_scores(groups, importance), groups.channels
    if torch.isnan(scores).any():
        raise ValueError("structured pruning scores contain NaN: a weight or its calibration statistics are not finite")
    already = removed_groups(groups, previous) if previous else None
    count = structured_count(total, pattern.sparsity)
    if per_kv_group and isinstance(groups, HeadGroups) and groups.queries_per_kv > 1:
        removed = select_removed_per_kv_group(scores, count, groups.num_kv_heads, already)
    else:
        removed = select_removed(scores, count, already)
    return structured_keep_masks(groups, removed, shapes), removed_indices(groups, removed)


def removed_indices(groups: HeadGroups | ChannelGroups, removed: Tensor) -> dict[str, list[int]]:
    """The removed group indices by kind, from ``(n,)`` bool ``removed``: ``{"heads", "kv_heads"}`` or ``{"channels"}``."""
    indices = torch.nonzero(removed).flatten().tolist()
    if isinstance(groups, HeadGroups):
        kv = torch.nonzero(kv_heads_removed(groups, removed)).flatten().tolist()
        return {"heads": indices, "kv_heads": kv}
    return {"channels": indices}
