"""LoRAPrune as its authors run it: prune the whole model while LoRA-training it on the language-modelling loss.

``pruners.loraprune`` scores each block on its own reconstruction objective. This module holds the
model-independent pieces of the *model-level* variant (``--loraprune-objective model``): a trainer
(the engine's streamed model-level trainer, or anything that calls the same three hooks) trains LoRA
adapters on every block linear on the causal-LM loss, and :class:`LoRAPruneController` turns the
adapters' gradients into importance, smooths it, and shrinks the keep masks on a schedule until they
meet the target pattern exactly.

What the aim-uofa/LoRAPrune code does, and what we take (``loraprune/utils.py``, ``trainer.py``):

- importance of a weight at a step: ``|G * (W + s B A)|`` with ``G = dB A + B dA - dB dA``
  (``pruners.loraprune.lora_gradient_estimate`` and ``lora_guided_importance``, unchanged);
- heads and channels (the authors' only granularity): per linear, the importance summed over each
  group's weights and divided by the L2 norm of that linear's group vector, the linears of a
  group added (``pruners.structured.head_scores`` / ``channel_scores``: the same sums, plus our
  grouped-query attention rule); the moving average ``I <- 0.9 I + 0.1 I_step`` is taken over these
  *group* scores, as the authors' ``update_sensitivity_dict`` does, so the controller keeps one float
  per head or channel;
- unstructured and N:M (not in the authors' code; the paper's criterion per weight): the same moving
  average per weight, and ``select_keep_mask`` on it;
- the masked forward ``P * (W + s B A)`` (``pruners.lowrank.LowRankLinear`` with ``provisional=True``;
  the authors multiply each output row by its mask, the same thing for row groups);
- the schedule: the authors' ``schedule_sparsity_ratio`` (Zhu & Gupta's cubic ramp) with their
  defaults: no pruning for the first 10% of the steps (``warmup_iters``), the cubic ramp, the target
  for the last 10% (``cooldown_iters``), pruning every ``prune_freq`` steps. Why this one: it is what
  the released code runs, it removes most weights early while the adapters can still adapt, and the
  final 10% train at the final masks, so the importance of the last selection has seen the model
  nearly as it ends. Two changes, both forced by our guarantees: their loop never prunes at the
  target itself (it prunes only while ``ratio < target``), so their final sparsity is the last ramp
  value; our masks in force at step ``s`` are at ``fraction(s)`` exactly, so the cool-down steps
  train at the target (and a run too short for a cool-down reaches it after its last step). And their ``prune_freq`` is 10 steps of a run of tens of thousands; our
  runs are tens to hundreds of steps, so we prune after every step of the ramp (``PRUNE_EVERY``).
  The authors also leave the first 10% of the layers and the last one dense (``freeze``); we prune
  every block to ``--sparsity`` (or the ``--allocation``), as every other pruner of this tool does.
- masks only shrink: each selection is nested in the one before (pruned groups or weights score
  ``-inf``, like the authors' ``importance * mask``).

Timing, for a trainer that streams blocks: ``accumulate(index, step, ...)`` runs when block
``index``'s adapter gradients of ``step`` are complete (the backward pass visits each block once per
step, after its last use in that step), and at a pruning step it already chooses that block's next
masks; they take effect from ``step + 1`` (:meth:`LoRAPruneController.keep_masks` takes the step),
so a block never sees its mask change between its forward and its backward.

Memory of the controller (float32 importance, bool masks; ``n`` = blocks):
- heads: per block ``num_heads`` floats + 2 ``num_heads`` bools (SmolLM2-135M: 9 heads, 30 blocks:
  under 2 KB in all);
- channels: per block 6 bytes a channel (SmolLM2: 1536 channels, 9 KB a block, 0.3 MB in all;
  LLaMA-7B: 11008 channels, 2 MB in all);
- unstructured / N:M: 5 bytes per prunable weight (float32 average + keep mask), plus 1 byte per
  weight of a block between a pruning step and its next load (the next mask). That is O(model):
  SmolLM2-135M's 106 M prunable weights need about 0.5 GB, LLaMA-7B's 6.5 G about 32 GB. It lives
  in an :class:`ImportanceStore` one block record at a time: :class:`HostImportanceStore` keeps every
  record in host memory (fine for small models); a disk store (one file per block) keeps host memory
  at one block's record and costs one read and one write of that record per block per step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from pruners.loraprune import EMA_DECAY
from pruners.masks import select_keep_mask
from pruners.pattern import SparsityPattern
from pruners.schedule import scaled_pattern
from pruners.stats import STATS_DTYPE
from pruners.structured import (
    ChannelGroups,
    HeadGroups,
    channel_scores,
    head_scores,
    select_removed,
    select_removed_per_kv_group,
    structured_count,
    structured_keep_masks,
)

logger = logging.getLogger(__name__)

WARMUP_SHARE = 0.1  # steps before the first pruning, as a share of all steps (authors' warmup_iters)
COOLDOWN_SHARE = 0.1  # steps trained at the final masks (authors' cooldown_iters)
PRUNE_EVERY = 1  # steps between pruning events on the ramp (authors: 10, in runs 100x longer)
GROUP_KEY = "groups"  # record key of a structured block's moving average and masks


# --------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class LoRAPruneSchedule:
    """When the model is pruned, and to which share of the target (LoRAPrune's cubic schedule).

    Steps are numbered from 0; pruning "after step t" uses the importance including step t and
    applies from step t + 1.
    """

    total_steps: int  # optimizer steps of the whole training
    prune_every: int = PRUNE_EVERY  # steps between pruning events on the ramp
    warmup: float = WARMUP_SHARE  # share of steps before any pruning
    cooldown: float = COOLDOWN_SHARE  # share of steps trained at the target

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"--loraprune-steps must be >= 1, got {self.total_steps}")
        if self.prune_every < 1:
            raise ValueError(f"the pruning interval must be >= 1 step, got {self.prune_every}")
        if not (0.0 <= self.warmup and 0.0 <= self.cooldown and self.warmup + self.cooldown < 1.0):
            raise ValueError(f"warm-up {self.warmup} and cool-down {self.cooldown} must be >= 0 and sum below 1")

    def fraction(self, step: int) -> float:
        """The share of the target sparsity scheduled at ``step`` (the authors' formula, from 0 to 1)."""
        total = self.total_steps
        start, end = self.warmup * total, total - self.cooldown * total
        if step <= start:
            return 0.0
        if step > end:
            return 1.0
        progress = (step - start) / (end - start)
        return 1.0 - (1.0 - progress) ** 3

    def prune_after(self, step: int) -> float | None:
        """The share of the target to prune to after ``step``, or None when the masks stay.

        The masks in force at step ``s`` are at ``fraction(s)``: after ``step`` the controller prunes
        to ``fraction(step + 1)`` when that is a ramp step (every ``prune_every``) or the first step at
        the target. ``fraction(total_steps)`` is 1, so every run ends at the target, and the cool-down
        steps train at it.
        """
        upcoming = self.fraction(step + 1)
        if upcoming >= 1.0:
            return 1.0 if self.fraction(step) < 1.0 else None
        if upcoming > 0.0 and (step + 1) % self.prune_every == 0:
            return upcoming
        return None

    def events(self) -> dict[int, float]:
        """``{step: fraction}`` of every pruning event, in step order."""
        found = {step: self.prune_after(step) for step in range(self.total_steps)}
        return {step: fraction for step, fraction in found.items() if fraction is not None}


# --------------------------------------------------------------------------- storage
class ImportanceStore(Protocol):
    """Where the controller keeps each block's record (moving average, masks): host memory or disk.

    ``checkpoint`` and ``restore`` make a resume exact: a trainer checkpointing after step ``k``
    calls ``checkpoint(k)`` and keeps what it returns in its own checkpoint file; a resumed one
    calls ``restore(k, that)`` before its next step, which undoes every record written after ``k``.
    """

    def load(self, index: int) -> dict[str, Tensor]:
        """Block ``index``'s record (empty before the first save)."""

    def save(self, index: int, record: dict[str, Tensor]) -> None:
        """Replace block ``index``'s record."""

    def checkpoint(self, step: int) -> dict[str, Tensor]:
        """Make the records as they are now restorable as of ``step``; returns tensors for the caller to save."""

    def restore(self, step: int, saved: dict[str, Tensor]) -> None:
        """Bring the records back to ``checkpoint(step)``, given what it returned."""


class HostImportanceStore:
    """Every block's record in host memory (CPU tensors): O(model) for per-weight patterns.

    A checkpoint is every record, in the caller's checkpoint file.
    """

    def __init__(self) -> None:
        self.records: dict[int, dict[str, Tensor]] = {}

    def load(self, index: int) -> dict[str, Tensor]:
        """Block ``index``'s record (a shallow copy; empty before the first save)."""
        return dict(self.records.get(index, {}))

    def save(self, index: int, record: dict[str, Tensor]) -> None:
        """Replace block ``index``'s record with CPU copies."""
        self.records[index] = {key: value.detach().to("cpu") for key, value in record.items()}

    def checkpoint(self, step: int) -> dict[str, Tensor]:
        """Every record, as ``{"<block>/<key>": tensor}`` (copies)."""
        return {f"{index}/{key}": value.clone() for index, record in self.records.items() for key, value in record.items()}

    def restore(self, step: int, saved: dict[str, Tensor]) -> None:
        """The records of a :meth:`checkpoint`."""
        self.records = {}
        for name, value in saved.items():
            index, _, key = name.partition("/")
            self.records.setdefault(int(index), {})[key] = value.clone()


# --------------------------------------------------------------------------- controller
@dataclass(frozen=True)
class BlockLayout:
    """What the controller needs to know about one block: its prunable linears and, if structured, its groups."""

    shapes: dict[str, tuple[int, int]]  # linear name (relative to the block) -> (out, in)
    groups: HeadGroups | ChannelGroups | None = None  # heads / channels patterns only
    pattern: SparsityPattern = SparsityPattern()  # this block's target (``--allocation`` may vary it)


def _ema_update(average: Tensor | None, value: Tensor, decay: float) -> Tensor:
    """``decay * average + (1 - decay) * value`` in float32 (``average`` starts at 0, as the authors')."""
    value = value.detach().to(dtype=STATS_DTYPE, device="cpu")
    if average is None:
        return value * (1.0 - decay)
    return average.mul(decay).add_(value, alpha=1.0 - decay)


class LoRAPruneController:
    """Holds LoRAPrune's importance and masks for every block of a model and prunes on the schedule.

    Args:
        layouts: one :class:`BlockLayout` per block, in block order.
        schedule: when to prune and how far.
        store: where block records live (default: host memory).
        per_kv_group: heads with grouped-query attention: remove the same number of query heads
            from every key/value group (``run --shrink``), as ``select_structured`` does.
        decay: the moving average's decay (the authors' 0.9).
    """

    def __init__(self, layouts: Sequence[BlockLayout], schedule: LoRAPruneSchedule,
                 store: ImportanceStore | None = None, per_kv_group: bool = False, decay: float = EMA_DECAY) -> None:
        for index, layout in enumerate(layouts):
            if layout.pattern.structured != (layout.groups is not None):
                raise ValueError(f"block {index}: a {layout.pattern.label} pattern needs groups exactly when structured")
        self.layouts = list(layouts)
        self.schedule = schedule
        self.store = store if store is not None else HostImportanceStore()
        self.per_kv_group = per_kv_group
        self.decay = decay
        self.history: list[dict[str, float]] = []  # one entry per pruning event: step, fraction, sparsity
        self._tally: dict[int, Tensor] = {}  # block -> its latest choice's (pruned, prunable, newly pruned, kept) sums

    # ----------------------------------------------------------------- masks
    def keep_masks(self, index: int, step: int) -> dict[str, Tensor]:
        """``{name: (out, in) bool}`` keep masks block ``index`` trains with at ``step`` (CPU tensors)."""
        layout = self.layouts[index]
        record = self.store.load(index)
        if layout.groups is None:
            return {name: self._current(record, name, step, (layout.shapes[name],)) for name in layout.shapes}
        return _expand_groups(layout, self._current(record, GROUP_KEY, step, (_group_count(layout.groups),)))

    def final_masks(self, index: int) -> dict[str, Tensor]:
        """Block ``index``'s keep masks after the last step: exactly its target pattern."""
        return self.keep_masks(index, self.schedule.total_steps)

    def _next_masks(self, layout: BlockLayout, record: dict[str, Tensor]) -> dict[str, Tensor]:
        """The weight keep masks a block's record has chosen for its next steps."""
        if layout.groups is None:
            return {name: record[f"next.{name}"] for name in layout.shapes}
        return _expand_groups(layout, record[f"next.{GROUP_KEY}"])

    @staticmethod
    def _current(record: dict[str, Tensor], key: str, step: int, shape: tuple) -> Tensor:
        """The keep mask (weights, or groups for structured blocks) in force at ``step``; all True at first."""
        upcoming = record.get(f"next.{key}")
        if upcoming is not None and step >= int(record["next_from"]):
            return upcoming
        kept = record.get(f"keep.{key}")
        return kept if kept is not None else torch.ones(*shape, dtype=torch.bool)

    # ----------------------------------------------------------------- training hooks
    def accumulate(self, index: int, step: int, importance: dict[str, Tensor]) -> None:
        """Fold block ``index``'s importance of ``step`` into its moving average; at a pruning step, choose its next masks.

        Args:
            index: the block.
            step: the optimizer step (from 0) whose gradients produced ``importance``.
            importance: ``{name: (out, in) float32}`` ``|G * (W + s B A)|`` of every linear of the block.
        """
        layout = self.layouts[index]
        record = self._promote(self.store.load(index), step)
        if layout.groups is None:
            for name in layout.shapes:
                record[f"ema.{name}"] = _ema_update(record.get(f"ema.{name}"), importance[name], self.decay)
        else:
            scores = _group_scores(layout.groups, importance)  # (groups,)
            record[f"ema.{GROUP_KEY}"] = _ema_update(record.get(f"ema.{GROUP_KEY}"), scores, self.decay)
        fraction = self.schedule.prune_after(step)
        if fraction is not None:
            self._choose_next(layout, record, fraction)
            record["next_from"] = torch.tensor(step + 1)
            self._tally[index] = self._choice_tally(layout, record)
        self.store.save(index, record)

    def step_done(self, step: int) -> None:
        """Record a pruning event's schedule point (every block has chosen its masks by now)."""
        fraction = self.schedule.prune_after(step)
        if fraction is None:
            return
        if len(self._tally) != len(self.layouts):
            missing = sorted(set(range(len(self.layouts))) - set(self._tally))
            raise RuntimeError(f"loraprune: step {step} ended before blocks {missing} reported their gradients")
        pruned, total, newly_sum, newly_count, kept_sum, kept_count = torch.stack(list(self._tally.values())).sum(0).tolist()
        ratio = (newly_sum / newly_count) / (kept_sum / kept_count) if newly_count and kept_sum else None
        self.history.append({"step": step, "fraction": fraction, "sparsity": pruned / max(total, 1),
                             "importance_ratio": ratio})
        self._tally.clear()
        logger.info("loraprune: after step %d, %.1f%% of the target, sparsity %.4f", step, 100 * fraction,
                    self.history[-1]["sparsity"])

    def _choice_tally(self, layout: BlockLayout, record: dict[str, Tensor]) -> Tensor:
        """``(6,)`` float64: pruned and prunable weights of the block's next masks; the importance average
        summed over the weights (heads or channels, when structured) this choice newly prunes, their
        count, and the same over the ones it keeps."""
        pruned, total = _masked_count(self._next_masks(layout, record))
        keys = [GROUP_KEY] if layout.groups is not None else list(layout.shapes)
        sums = torch.zeros(4, dtype=torch.float64)  # newly pruned sum, count, kept sum, count
        for key in keys:
            average, chosen = record[f"ema.{key}"].double(), record[f"next.{key}"]
            before = record.get(f"keep.{key}", torch.ones_like(chosen))
            newly = before & ~chosen
            sums += torch.stack([average[newly].sum(), newly.sum(), average[chosen].sum(), chosen.sum()]).double()
        return torch.cat([torch.tensor([pruned, total], dtype=torch.float64), sums])

    # ----------------------------------------------------------------- resume
    def checkpoint(self, step: int) -> dict[str, Tensor]:
        """State after ``step`` steps (counted from 1) for a trainer's checkpoint: the store's and the history.

        Call it between steps (no block half-way through a step).
        """
        nan = float("nan")  # no ratio: the event pruned nothing new
        history = torch.tensor([[e["step"], e["fraction"], e["sparsity"], e["importance_ratio"] or nan]
                                for e in self.history], dtype=torch.float64).reshape(-1, 4)  # (events, 4)
        return {"history": history, **{f"store/{key}": value for key, value in self.store.checkpoint(step).items()}}

    def restore(self, step: int, saved: dict[str, Tensor]) -> None:
        """Back to :meth:`checkpoint` ``(step)``: the next step to train is ``step`` (from 0)."""
        self.store.restore(step, {key[len("store/"):]: value for key, value in saved.items() if key.startswith("store/")})
        self.history = [{"step": int(row[0]), "fraction": row[1], "sparsity": row[2],
                         "importance_ratio": None if math.isnan(row[3]) else row[3]} for row in saved["history"].tolist()]
        self._tally.clear()

    # ----------------------------------------------------------------- selection
    @staticmethod
    def _promote(record: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """Make masks chosen for ``step`` or earlier the current ones (the record, updated)."""
        if "next_from" in record and step >= int(record["next_from"]):
            for key in [key for key in record if key.startswith("next.")]:
                record["keep." + key[len("next."):]] = record.pop(key)
            del record["next_from"]
        return record

    def _choose_next(self, layout: BlockLayout, record: dict[str, Tensor], fraction: float) -> None:
        """Choose the block's masks at ``fraction`` of its target, nested in the current ones, into ``next.*``."""
        pattern = scaled_pattern(layout.pattern, fraction)
        if layout.groups is None:
            for name, shape in layout.shapes.items():
                within = record.get(f"keep.{name}", torch.ones(shape, dtype=torch.bool))
                record[f"next.{name}"] = select_keep_mask(record[f"ema.{name}"], pattern, within)
            return
        kept = record.get(f"keep.{GROUP_KEY}")
        already = None if kept is None else ~kept
        scores = record[f"ema.{GROUP_KEY}"]
        count = structured_count(scores.shape[0], pattern.sparsity)
        groups = layout.groups
        if self.per_kv_group and isinstance(groups, HeadGroups) and groups.queries_per_kv > 1:
            count -= count % groups.num_kv_heads if fraction < 1.0 else 0  # intermediate steps round down
            removed = select_removed_per_kv_group(scores, count, groups.num_kv_heads, already)
        else:
            removed = select_removed(scores, count, already)
        record[f"next.{GROUP_KEY}"] = ~removed


def _masked_count(masks: dict[str, Tensor]) -> tuple[int, int]:
    """``(pruned, total)`` weights of a block's keep masks."""
    return sum(int((~mask).sum()) for mask in masks.values()), sum(mask.numel() for mask in masks.values())


def _expand_groups(layout: BlockLayout, kept_groups: Tensor) -> dict[str, Tensor]:
    """``{name: (out, in) bool}`` of every linear of a structured block from its ``(groups,)`` kept groups.

    Linears outside the heads or channels (the MLP under ``heads``, say) keep every weight.
    """
    masks = structured_keep_masks(layout.groups, ~kept_groups, layout.shapes)
    return {name: masks.get(name, torch.ones(shape, dtype=torch.bool)) for name, shape in layout.shapes.items()}


def _group_count(groups: HeadGroups | ChannelGroups) -> int:
    """Heads or channels of a block."""
    return groups.num_heads if isinstance(groups, HeadGroups) else groups.channels


def _group_scores(groups: HeadGroups | ChannelGroups, importance: dict[str, Tensor]) -> Tensor:
    """``(groups,)`` one step's group scores: per-linear group sums, L2-normalised, added (``pruners.structured``)."""
    if isinstance(groups, HeadGroups):
        return head_scores(groups, importance)
    return channel_scores(groups, importance)
