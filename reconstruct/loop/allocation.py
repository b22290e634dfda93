"""Per-block sparsities before block 0 is pruned: an explicit file, or OWL's pre-pass over the dense model.

``--allocation owl`` needs every block's outlier ratio (``pruners.allocation``) before the first
block is pruned: a streamed pass over the dense model (one more read of every block's weights, no
pruning, the memory of a dense block pass) feeds the Wanda statistics ``‖X_j‖₂`` of each block's
linears on the dense model's inputs and propagates the dense stream. The result is saved in the
manifest, so a resume, also one killed right after the pre-pass, does not run it again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from calib.activations import ActivationStream
from pruners.allocation import outlier_ratio, owl_sparsities, weighted_mean
from pruners.stats import SumSquaresStats
from pruners.wanda import wanda_scores
from reconstruct.config import JobConfig
from calib.hooks import feeding_statistics
from reconstruct.loop.streams import run_stream
from reconstruct.modelio.architecture import weight_as_out_in
from reconstruct.modelio.loaded import LoadedModel
from reconstruct.parallel import distributed
from reconstruct.progress import progress_bar

logger = logging.getLogger(__name__)


class BlockWandaScores:
    """The Wanda scores ``|W| · ‖X‖₂`` of a block's linears, built one linear at a time on each iteration."""

    def __init__(self, linears: dict[str, nn.Module], stats: dict[str, SumSquaresStats]):
        self.linears = linears
        self.stats = stats

    def __iter__(self) -> Iterator[Tensor]:
        for name, module in self.linears.items():
            yield wanda_scores(weight_as_out_in(module).detach().float(), self.stats[name].sum_sq)  # (out, in)


def prunable_counts(loaded: LoadedModel) -> list[int]:
    """Prunable weights of every block (the weights of the allocation's mean), from the skeleton's shapes."""
    counts = []
    for block in loaded.blocks:
        shapes = (weight_as_out_in(block.get_submodule(name)).shape for name in loaded.layout.linear_names)
        counts.append(sum(rows * cols for rows, cols in shapes))
    return counts


@torch.no_grad()
def outlier_pass(loaded: LoadedModel, forward_fn, stream: ActivationStream, micro_batch: int,
                 owl_m: float) -> list[float]:
    """The OWL pre-pass: every block's outlier ratio on the dense model's inputs.

    Args:
        loaded: the model; each block is loaded, used and released in turn.
        forward_fn: ``(block, index) → (x (b, T, H) → block(x) (b, T, H))`` with block ``index``'s arguments.
        stream: block 0's inputs; overwritten, block by block, with the dense model's activations.
        micro_batch: samples per block forward.
        owl_m: the outlier threshold M.

    Returns:
        One outlier ratio per block.
    """
    layout = loaded.layout
    ratios = []
    for index in progress_bar(range(layout.n_blocks), desc="allocation pass", unit="block"):
        with loaded.visiting_block(index) as block:
            linears = {name: block.get_submodule(name) for name in layout.linear_names}
            stats = {name: SumSquaresStats(weight_as_out_in(module).shape[1], loaded.device)
                     for name, module in linears.items()}
            with feeding_statistics(linears, stats):  # the full forward: its output is the next block's input
                run_stream(forward_fn(block, index), stream, micro_batch, destination=stream)
            distributed.all_reduce_statistics(stats.values())  # every rank's tokens: every rank gets the same ratio
            ratios.append(outlier_ratio(BlockWandaScores(linears, stats), owl_m))
        logger.debug("allocation pass: block %d outlier ratio %.5f", index + 1, ratios[-1])
    return ratios


def compute_allocation(job: JobConfig, loaded: LoadedModel, forward_fn, block0_inputs: ActivationStream,
                       scratch: ActivationStream | None) -> dict:
    """The job's per-block sparsities and how they were found, as stored in the manifest.

    Args:
        job: the job (``job.prune.allocation`` says how).
        loaded: the model.
        forward_fn: as in :func:`outlier_pass`.
        block0_inputs: block 0's calibration inputs (left unchanged).
        scratch: a stream of the same shape that the OWL pass overwrites (the dense stream, or a spare
            one); unused (may be None) for a file's sparsities.

    Returns:
        ``{"kind", "sparsities", "param_counts", "target", "mean_sparsity"}``, plus ``"outlier_ratios"``,
        ``"owl_m"``, ``"owl_lambda"`` for OWL.
    """
    allocation, target = job.prune.allocation, job.prune.pattern.sparsity
    counts = prunable_counts(loaded)
    record: dict = {"kind": allocation.kind, "target": target, "param_counts": counts}
    if allocation.kind == "file":
        sparsities = list(allocation.sparsities)
        record["file"] = allocation.file
    else:
        assert scratch is not None, "the OWL pre-pass needs a scratch stream"
        scratch.copy_from(block0_inputs)
        ratios = outlier_pass(loaded, forward_fn, scratch, job.micro_batch, allocation.owl_m)
        sparsities = owl_sparsities(ratios, counts, target, allocation.owl_lambda)
        record.update(outlier_ratios=ratios, owl_m=allocation.owl_m, owl_lambda=allocation.owl_lambda)
    record["sparsities"] = sparsities
    record["mean_sparsity"] = weighted_mean(sparsities, counts)
    logger.info("allocation %s: block sparsities %s (weighted mean %.4f)", allocation.kind,
                " ".join(f"{s:.3f}" for s in sparsities), record["mean_sparsity"])
    return record
