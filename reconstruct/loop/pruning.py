"""The pruning steps of the block pipeline: statistics, masks, structured removal, given masks.

``PruningSteps`` is the half of ``BlockPipeline`` that chooses and applies keep masks; the pipeline
(``loop.pipeline``) supplies what it reads: ``job``, ``pruner``, ``device``, ``split``,
``model_config``, ``structure``, ``given_masks``, and the methods ``calibration``, ``call_order``,
``groups`` and ``block_seed``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from calib.hooks import feeding_statistics
from pruners import get_pruner
from pruners.base import BlockTraining, GivenScores
from pruners.masks import select_keep_mask
from pruners.schedule import scaled_pattern, schedule_fraction
from pruners.structured import (
    ChannelGroups,
    HeadGroups,
    find_groups,
    removed_groups,
    removed_indices,
    select_structured,
)
from reconstruct.faults import crash_point
from reconstruct.loop.block_report import describe_structure
from reconstruct.loop.context import BlockContext
from reconstruct.loop.streams import run_stream
from reconstruct.methods import block_trainer
from reconstruct.modelio.architecture import weight_as_out_in
from reconstruct.modelio.experts import expert_linear_names
from reconstruct.parallel import distributed

logger = logging.getLogger(__name__)


def prune_layer(module: nn.Module, pruner, stats, pattern, within: torch.Tensor | None = None) -> torch.Tensor:
    """Prune one linear in place and return its keep mask, shape (out, in) (a subset of ``within``)."""
    weight = weight_as_out_in(module).detach().float().clone()  # (out, in)
    new_weight, keep_mask = pruner.prune(weight, stats, pattern, within)
    assert bool((keep_mask | (new_weight == 0)).all()), "pruner returned non-zero pruned weights"
    with torch.no_grad():
        target = weight_as_out_in(module)  # a view: writing it writes the parameter
        target.copy_(new_weight.to(target.dtype))
    return keep_mask


class PruningSteps:
    """Choose and apply one block's keep masks (a base of ``BlockPipeline``; see the module docstring)."""

    def _prune(self, ctx: BlockContext, pattern) -> None:
        """Prune the block to ``pattern``, nested in ``ctx.keep_masks`` (earlier cycles), which it updates."""
        if self.given_masks is not None:
            self._prune_given(ctx, pattern)
            return
        if pattern.structured:
            self._prune_structured(ctx, pattern)
            return
        experts = expert_linear_names(ctx.block)
        for group in self.groups(ctx):
            stats = self._pruner_inputs(ctx, {name: ctx.linears[name] for name in group})
            for name in group:
                pruner, layer_stats = self._layer_pruner(ctx, name, stats.get(name), name in experts)
                ctx.keep_masks[name] = prune_layer(ctx.linears[name], pruner, layer_stats, pattern,
                                                   ctx.keep_masks.get(name))
            del stats

    def _layer_pruner(self, ctx: BlockContext, name: str, stats, is_expert: bool):
        """``(pruner, statistics)`` for linear ``name``: the job's, or magnitude for a starved expert.

        An expert's linears see only the tokens the router sends it; one that saw fewer than
        ``--min-expert-tokens`` calibration tokens (none, possibly) has no statistics worth the name, so
        it is pruned by weight magnitude, and the block's report counts it (``BlockReport.experts``).
        """
        if not is_expert:
            return self.pruner, stats
        minimum = self.job.prune.min_expert_tokens
        expert = name.rsplit(".", 1)[0]
        record = ctx.report.experts
        if not record:
            record.update(experts=len({other.rsplit(".", 1)[0] for other in expert_linear_names(ctx.block)}),
                          min_tokens=minimum, few_tokens={})
        tokens = getattr(stats, "n_tokens", None)  # hook statistics (summed over ranks); None: no statistics
        if tokens is None or int(tokens) >= minimum:
            return self.pruner, stats
        record["few_tokens"][expert] = int(tokens)
        return get_pruner("magnitude"), None

    def find_structure(self, ctx: BlockContext, pattern) -> HeadGroups | ChannelGroups:
        """The heads or channels a structured ``pattern`` prunes (found once, on the first block pruned)."""
        if self.structure is None:
            shapes = {name: tuple(weight_as_out_in(module).shape) for name, module in ctx.linears.items()}
            self.structure = find_groups(pattern, self.call_order(ctx), shapes, self.model_config)
            logger.info("--pattern %s: %s", pattern.kind, describe_structure(self.structure))
        return self.structure

    def _prune_structured(self, ctx: BlockContext, pattern) -> None:
        """Remove whole heads or channels (pruners.structured); the other linears stay dense."""
        members = {name: ctx.linears[name] for name in self.find_structure(ctx, pattern).linears}
        stats = self._pruner_inputs(ctx, members)
        importance = {
            name: self.pruner.importance(weight_as_out_in(module).detach().float(), stats.get(name))
            for name, module in members.items()
        }
        del stats
        previous = {name: ctx.keep_masks[name] for name in members if name in ctx.keep_masks}
        masks, ctx.report.removed = select_structured(pattern, self.structure, importance, previous or None,
                                                        self.job.prune.heads_per_kv_group)
        with torch.no_grad():
            for name, keep_mask in masks.items():
                weight = weight_as_out_in(ctx.linears[name])  # a view: writing it writes the parameter
                weight.masked_fill_(~keep_mask.to(weight.device), 0.0)
                ctx.keep_masks[name] = keep_mask
        for name, module in ctx.linears.items():  # untouched linears: everything kept
            ctx.keep_masks.setdefault(name, self._keep_all(module))

    def _prune_given(self, ctx: BlockContext, pattern) -> None:
        """Zero what the block's given keep masks prune (model-level LoRAPrune chose them at ``pattern``)."""
        masks = self.given_masks(ctx.index)
        with torch.no_grad():
            for name, module in ctx.linears.items():
                weight = weight_as_out_in(module)  # a view: writing it writes the parameter
                keep_mask = masks[name].to(device=weight.device, dtype=torch.bool)
                weight.masked_fill_(~keep_mask, 0.0)
                ctx.keep_masks[name] = keep_mask
        if pattern.structured:
            structure = self.find_structure(ctx, pattern)
            ctx.report.removed = removed_indices(structure, removed_groups(structure, ctx.keep_masks))

    def _pruner_inputs(self, ctx: BlockContext, group: dict[str, nn.Module]) -> dict:
        """What the pruner needs for ``group``: hook statistics, or scores from block training (LoRAPrune)."""
        if not self.pruner.needs_block_training:
            return self._collect_statistics(ctx, group)
        scores = self.pruner.score_block(self._block_training(ctx, group))
        crash_point(f"statistics:{ctx.index}")
        return {name: GivenScores(scores[name]) for name in group}

    def _block_training(self, ctx: BlockContext, group: dict[str, nn.Module]) -> BlockTraining:
        """The block, its objective and the trainer, for a block-training pruner (LoRAPrune)."""
        current = {name: ctx.keep_masks[name] if name in ctx.keep_masks else self._keep_all(module)
                   for name, module in group.items()}
        prune = self.job.prune  # provisional masks ramp from the previous cycle's sparsity to this one's
        start = schedule_fraction(ctx.cycle - 1, prune.cycles, prune.cycle_schedule) if ctx.cycle > 1 else 0.0
        end = schedule_fraction(ctx.cycle, prune.cycles, prune.cycle_schedule)
        seed = self.block_seed(ctx.index, ctx.cycle)
        return BlockTraining(
            block=ctx.block, linears=group, keep_masks=current, forward=ctx.objective, inputs=ctx.sparse,
            targets=ctx.targets, seed=seed, micro_batch=self.job.micro_batch,
            select_masks=lambda scores, fraction, within: self._select_masks(
                scores, scaled_pattern(ctx.pattern, start + fraction * (end - start)), within),
            train=block_trainer(ctx.objective, ctx.sparse, ctx.targets, seed, self.job.micro_batch,
                                samples=None if self.split is None else self.split.calibration),
        )

    def _keep_all(self, module: nn.Module) -> torch.Tensor:
        """A keep mask that keeps every weight of ``module``, shape (out, in)."""
        return torch.ones(weight_as_out_in(module).shape, dtype=torch.bool, device=self.device)

    def _select_masks(self, scores: dict[str, torch.Tensor], pattern, within: dict[str, torch.Tensor]) -> dict:
        """Keep masks ``pattern`` chooses from ``scores`` (per linear), nested in ``within``; changes no weight."""
        if pattern.structured:
            masks, _ = select_structured(pattern, self.structure, scores, within or None,
                                           self.job.prune.heads_per_kv_group)
            return masks
        return {name: select_keep_mask(value, pattern, within.get(name)) for name, value in scores.items()}

    def _collect_statistics(self, ctx: BlockContext, group: dict[str, nn.Module]) -> dict:
        """Hook statistics of ``group``'s inputs on the pruned stream, summed over ranks (empty if none needed)."""
        if not self.pruner.needs_calibration:
            return {}
        stats = {
            name: self.pruner.new_stats(weight_as_out_in(module).shape[1], self.device) for name, module in group.items()
        }
        with feeding_statistics(group, stats) as cut_short:
            # outputs unused: stop once all are fed; calibration rows only (never --recon-val-data's)
            run_stream(cut_short(ctx.forward), self.calibration(ctx.sparse), self.job.micro_batch)
        distributed.all_reduce_statistics(stats.values())  # every rank's tokens, before any mask is chosen
        crash_point(f"statistics:{ctx.index}")
        return stats
