"""Which heads and channels every block removed, and whether a config can describe what is left.

Two sources: the per-block ``removed`` lists of ``reconstruct.json`` (a ``--pattern heads`` or
``channels`` job), checked against the tensors; or, for any other folder (a model pruned by another
tool), the groups whose output-side weights are all zero: a head whose columns of the output
projection are zero, a channel whose column of the down projection is zero. Either way, deleting a
group is exact because nothing it computes reaches the block's output.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pruners.structured import ChannelGroups, HeadGroups, kv_heads_removed
from reconstruct.modelio.loaded import LoadedModel
from reconstruct.modelio.output import REPORT_NAME
from reconstruct.shrink.families import ShrunkSizes, check_shrinkable
from reconstruct.shrink.roles import BlockRoles, output_weight

logger = logging.getLogger(__name__)

FROM_REPORT = "reconstruct.json"
FROM_ZEROS = "all-zero groups"


@dataclass(frozen=True)
class ShrinkPlan:
    """What to delete in every block, and the sizes that remain."""

    removed: tuple[dict[str, list[int]], ...]  # per block: "heads", "kv_heads", "channels" (sorted indices)
    sizes: ShrunkSizes
    found_by: str  # FROM_REPORT or FROM_ZEROS

    def to_dict(self) -> dict:
        """JSON form (stored in the shrink state and in ``shrink.json``)."""
        return {"removed": list(self.removed), "sizes": asdict(self.sizes), "found_by": self.found_by}


def zero_column_groups(weight: torch.Tensor, n_groups: int) -> list[int]:
    """Groups of consecutive columns of an ``(out, in)`` weight that are entirely zero."""
    zero_columns = (weight == 0).all(dim=0)  # (in,)
    return torch.nonzero(zero_columns.reshape(n_groups, -1).all(dim=1)).flatten().tolist()


def listed_groups(folder: Path) -> tuple[str, list[list[int]]] | None:
    """``(kind, per-block removed indices)`` from ``reconstruct.json`` of a structured job; None otherwise."""
    path = folder / REPORT_NAME
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    kind = (report.get("job", {}).get("pattern") or {}).get("kind")
    if kind not in ("heads", "channels"):
        return None
    blocks = sorted(report.get("blocks", []), key=lambda block: block["index"])
    return kind, [sorted(block.get("removed", {}).get(kind, [])) for block in blocks]


def find_removed(loaded: LoadedModel, roles: BlockRoles) -> ShrinkPlan:
    """The groups to delete in every block (see the module docstring), checked with :func:`check_plan`.

    Raises:
        ValueError: nothing to delete, a listed group that is not zero, or a result no config can express.
    """
    listed = listed_groups(loaded.folder)
    n_blocks = loaded.layout.n_blocks
    if listed is not None and len(listed[1]) != n_blocks:
        raise ValueError(f"{loaded.folder}/{REPORT_NAME} lists {len(listed[1])} blocks, the model has {n_blocks}")
    removed = []
    for index in range(n_blocks):
        zero = {}
        if roles.heads is not None:
            weight = output_weight(loaded, roles, index, roles.heads.output)
            zero["heads"] = zero_column_groups(weight, roles.heads.num_heads)
        if roles.channels is not None:
            weight = output_weight(loaded, roles, index, roles.channels.down)
            zero["channels"] = zero_column_groups(weight, roles.channels.channels)
        loaded.reader.close()
        if listed is not None:
            kind, groups = listed[0], listed[1][index]
            not_zero = sorted(set(groups) - set(zero.get(kind, [])))
            if not_zero:
                raise ValueError(f"block {index + 1}: {REPORT_NAME} lists {kind} {not_zero} as removed, but their "
                                 "output weights are not zero; the folder was changed after pruning")
            zero = {kind: groups}
        removed.append({kind: groups for kind, groups in zero.items() if groups})
    plan_removed = tuple(_with_kv_heads(block, roles.heads) for block in removed)
    sizes = check_plan(plan_removed, roles, loaded.config.model_type)
    return ShrinkPlan(plan_removed, sizes, FROM_REPORT if listed is not None else FROM_ZEROS)


def _with_kv_heads(block: dict[str, list[int]], heads: HeadGroups | None) -> dict[str, list[int]]:
    """Add the key/value heads left with no query head (``pruners.structured.kv_heads_removed``)."""
    if heads is None or "heads" not in block:
        return block
    mask = torch.zeros(heads.num_heads, dtype=torch.bool)
    mask[block["heads"]] = True
    return {**block, "kv_heads": torch.nonzero(kv_heads_removed(heads, mask)).flatten().tolist()}


def _uniform_count(removed: tuple[dict[str, list[int]], ...], kind: str) -> int:
    """The number of ``kind`` groups every block removes.

    Raises:
        ValueError: blocks remove different numbers.
    """
    counts = [len(block.get(kind, [])) for block in removed]
    if len(set(counts)) > 1:
        shown = ", ".join(f"block {i + 1}: {count}" for i, count in enumerate(counts))
        label = "key/value heads" if kind == "kv_heads" else kind
        raise ValueError(f"--shrink: blocks remove different numbers of {label} ({shown}); a config describes one "
                         "size for all blocks (run --shrink prunes the same query heads per key/value group)")
    return counts[0] if counts else 0


def check_plan(removed: tuple[dict[str, list[int]], ...], roles: BlockRoles, model_type: str) -> ShrunkSizes:
    """The sizes every block keeps, after checking that the family's config can express them.

    Raises:
        ValueError: nothing removed, uneven counts across blocks, heads of a family that derives the
            head size, or a grouped-query layout that would not stay expressible.
    """
    n_heads, n_channels = _uniform_count(removed, "heads"), _uniform_count(removed, "channels")
    if n_heads == 0 and n_channels == 0:
        raise ValueError("--shrink: no removed heads or channels found (none listed in reconstruct.json and no head "
                         "or MLP channel whose output weights are all zero); nothing to shrink")
    sizes = ShrunkSizes()
    if n_channels:
        channels: ChannelGroups = roles.channels
        if n_channels >= channels.channels:
            raise ValueError(f"--shrink: every block removes all {channels.channels} MLP channels")
        sizes = ShrunkSizes(channels=channels.channels - n_channels)
    if n_heads:
        check_shrinkable(model_type, "heads")
        heads: HeadGroups = roles.heads
        n_kv = _uniform_count(removed, "kv_heads")
        kept = {_kept_per_kv_group(block["heads"], heads, index) for index, block in enumerate(removed)}
        if len(kept) > 1:
            raise ValueError(f"--shrink: blocks keep different numbers of query heads per key/value head ({sorted(kept)})")
        sizes = ShrunkSizes(heads.num_heads - n_heads, heads.num_kv_heads - n_kv, heads.head_dim, sizes.channels)
    return sizes


def _kept_per_kv_group(removed_heads: list[int], heads: HeadGroups, index: int) -> int:
    """Query heads every surviving key/value head keeps in block ``index``.

    Raises:
        ValueError: key/value groups keep different numbers of query heads (transformers' ``repeat_kv``
            gives every key/value head the same number of query heads).
    """
    mask = torch.ones(heads.num_heads, dtype=torch.bool)
    mask[removed_heads] = False
    kept = mask.reshape(heads.num_kv_heads, heads.queries_per_kv).sum(dim=1)  # (num_kv,)
    sizes = sorted(set(kept[kept > 0].tolist()))
    if len(sizes) != 1:
        raise ValueError(
            f"--shrink: block {index + 1} keeps {kept.tolist()} query heads in its {heads.num_kv_heads} key/value groups; "
            "grouped-query attention needs the same number in every kept group (remove the same number of query "
            "heads from every key/value group, or whole groups)"
        )
    return sizes[0]
