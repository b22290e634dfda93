"""LoRAPrune (Zhang et al., arXiv 2305.18403): importance from the gradients of LoRA adapters.

First-order Taylor importance of a weight is ``|dL/dW_ij * W_ij|``, but ``dL/dW`` of a whole LLM costs
as much memory as its weights. LoRAPrune attaches LoRA adapters ``W + s B A`` and estimates ``dL/dW``
from the adapters' own gradients: one step of size 1 on ``B`` and ``A`` changes ``B A`` by
``(B - dB)(A - dA) - B A``, so (as the aim-uofa/LoRAPrune code computes it)

    G = dB A + B dA - dB dA                                   (out, in), dB = dL/dB, dA = dL/dA
    I_ij = |G_ij * (W + s B A)_ij|                            the LoRA-guided importance

and ``I`` is smoothed over the training steps with an exponential moving average,
``I <- 0.9 I + 0.1 I_step`` starting from 0 (the reference code's 0.9; the paper's lambda). The paper
also writes the squared form ``(G * (W + s B A))^2``; we follow the released code's absolute value.

Here the loss is the block reconstruction objective (pruned-stream input, dense targets: the same MSE
that ``reconstruct.methods.train_reconstruction`` minimises, with its seeded sampling and AdamW; the
engine hands that trainer over as ``BlockTraining.train``), and
the training is a short warm-up per block (``steps``, default 20, one sample a step). As in LoRAPrune,
pruning happens *during* the LoRA training: the adapters (``pruners.lowrank.LowRankLinear`` with
``provisional=True``) compute ``P * (W + s B A)`` with a provisional keep mask ``P``, and
``PROVISIONAL_EVENTS - 1`` times during the warm-up (steps 5, 10, 15 of 20) ``P`` is re-chosen from the importance so far at
1/4, 2/4, 3/4 of the target sparsity, each nested in the one before (nothing is un-pruned). The
final mask, at the target, is chosen from the importance after the last step (see
``BlockTraining.select_masks``: the engine's pattern, N:M or heads/channels, and ``--cycles``).

Why provisional pruning is needed here, not only faithful: the gradient of the block objective is
exactly zero when the block reproduces its targets, which block 0 does before anything is pruned
(its pruned-stream input is still the dense input), and nearly zero at every later block (only the
error of earlier blocks drives it). Importance measured at the dense block is then zero or noise,
and ties would prune by column index. Once some weights are provisionally gone, the objective has
a gradient that says which remaining weights the block needs. While the importance is still all
zero (block 0's first steps), provisional masks rank by ``|W + s B A|`` (the reference code's
``magnitude`` metric).

Caveat (measured on SmolLM2-135M, 8 x 128 calibration tokens, 50% unstructured, no
reconstruction): the per-block MSE lands near magnitude pruning's and well above Wanda's. The
estimate ``dB A + B dA`` is the gradient projected onto the adapters' rank-2r subspace, and after a
20-step warm-up A is still close to its random init, so per-weight scores carry much projection
noise; structured scores (sums over whole heads/channels) average much of it out. A larger
``--loraprune-lr`` or more ``--loraprune-steps`` let the adapters align: per-block MSE of the first
4 blocks fell from 0.60/1.41/6.45/7.06 at lr 5e-4 to 0.47/1.01/4.40/4.76 at 2e-2 (the default) and
rose again at 5e-2; 40 steps at 2e-2 gave 0.34/0.81/3.95/4.33 (Wanda: 0.19/0.44/1.31/1.59,
magnitude 0.46/1.07/7.42/7.85).

The adapters are removed, never merged, before the block is pruned and ``--method`` reconstructs it.
Unstructured and N:M masks come from ``select_keep_mask`` on the importance; structured patterns sum
it over heads or channels (``pruners.structured``), as LoRAPrune's own head/channel criterion does.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch
from torch import Tensor, nn

from pruners.layers import weight_as_out_in
from pruners.lowrank import LowRankLinear, layer_seed, swap_module
from pruners.base import BlockTraining, GivenScores, Pruner, apply_keep_mask, prepare_weight
from pruners.masks import select_keep_mask
from pruners.pattern import SparsityPattern
from pruners.stats import STATS_DTYPE

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 20  # warm-up optimizer steps per block (and per cycle)
DEFAULT_RANK = 8  # LoRAPrune's lora_r
DEFAULT_LR = 2e-2  # high: the estimate improves as the adapters align with the gradient (docs/pruning.md)
EMA_DECAY = 0.9  # importance <- decay * importance + (1 - decay) * step importance (reference code)
ALPHA_PER_RANK = 2.0  # alpha = 2 r (LoRAPrune: r 8, alpha 16), so the update scale alpha / r is 2
BATCH_SIZE = 1  # calibration samples per warm-up step: one gradient per sample into the EMA
PROVISIONAL_EVENTS = 4  # provisional pruning steps within a warm-up (LoRAPrune's iterative pruning)


def check_loraprune_options(steps: int, rank: int, lr: float) -> None:
    """Raise ``ValueError`` naming the flag when a LoRAPrune option is out of range."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"--loraprune-steps must be an integer >= 1, got {steps!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"--loraprune-rank must be an integer >= 1, got {rank!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"--loraprune-lr must be a number > 0, got {lr!r}")


def lora_gradient_estimate(lora_a: Tensor, lora_b: Tensor, grad_a: Tensor, grad_b: Tensor) -> Tensor:
    """LoRAPrune's estimate of ``dL/dW`` from the adapter factors and their gradients.

    Args:
        lora_a: ``(r, in)`` A.
        lora_b: ``(out, r)`` B.
        grad_a: ``(r, in)`` dL/dA.
        grad_b: ``(out, r)`` dL/dB.

    Returns:
        ``(out, in)`` float32 ``dB A + B dA - dB dA``.
    """
    a, b = lora_a.detach().float(), lora_b.detach().float()
    ga, gb = grad_a.detach().float(), grad_b.detach().float()
    return gb @ a + b @ ga - gb @ ga  # (out, in)


def lora_guided_importance(effective_weight: Tensor, gradient: Tensor) -> Tensor:
    """``|G * (W + s B A)|``: ``(out, in)`` float32 from two ``(out, in)`` tensors."""
    return (gradient * effective_weight.detach().float()).abs()


class ImportanceEMA:
    """Exponential moving average of per-linear importance over training steps, in float32."""

    def __init__(self, shapes: dict[str, tuple[int, int]], device: torch.device | str, decay: float = EMA_DECAY):
        self.decay = decay
        self.values = {name: torch.zeros(shape, dtype=STATS_DTYPE, device=device) for name, shape in shapes.items()}
        self.steps = 0

    def update(self, name: str, step_importance: Tensor) -> None:
        """``value <- decay * value + (1 - decay) * step_importance`` for one linear."""
        value = self.values[name]
        value.mul_(self.decay).add_(step_importance.to(value.device, value.dtype), alpha=1.0 - self.decay)


def attach_scoring_adapters(block: nn.Module, linears: dict[str, nn.Module], keep_masks: dict[str, Tensor],
                            rank: int, seed: int) -> dict[str, LowRankLinear]:
    """Wrap each of ``linears`` in the block (by its path) with a provisional LoRA adapter.

    The adapter (``pruners.lowrank.LowRankLinear``, kind ``lora``, ``provisional=True``) computes
    LoRAPrune's masked forward ``P * (W + s B A)``, s = ``ALPHA_PER_RANK``, with its own copy of
    ``keep_masks[name]`` as the provisional mask ``P``; A starts as in peft and B at 0, so the layer
    starts at ``P * W``.
    """
    wrappers: dict[str, LowRankLinear] = {}
    try:
        for name, linear in linears.items():
            wrapper = LowRankLinear(linear, keep_masks[name], kind="lora", rank=rank, alpha=ALPHA_PER_RANK * rank,
                                    seed=layer_seed(seed, name), provisional=True)
            swap_module(block, name, linear, wrapper)
            wrappers[name] = wrapper
    except Exception:
        detach_scoring_adapters(block, wrappers)
        raise
    return wrappers


def detach_scoring_adapters(block: nn.Module, wrappers: dict[str, LowRankLinear]) -> None:
    """Put the original linears back (the block is then exactly as before the attach)."""
    for name, wrapper in wrappers.items():
        swap_module(block, name, wrapper, wrapper.base)


def provisional_events(steps: int, events: int) -> dict[int, float]:
    """``{step: fraction}``: before ``step``, prune provisionally to ``fraction`` of the target.

    ``events`` evenly spaced events over the warm-up, the fractions ramping linearly from ``1/events``
    (at step 0) to ``(events - 1)/events``; the warm-up ends at the target with the final selection.
    """
    if events <= 1:
        return {0: 1.0} if events == 1 else {}
    return {round(e * steps / events): e / events for e in range(1, events)}


class LoRAPrunePruner(Pruner):
    """Scores weights by LoRA-guided importance after a short per-block LoRA warm-up.

    Args:
        loraprune_steps: warm-up steps per block (each: ``BATCH_SIZE`` samples, AdamW, linear decay);
            provisional pruning at 1/4, 2/4, 3/4 of them.
        loraprune_rank: adapter rank r (alpha = 2 r).
        loraprune_lr: AdamW learning rate of the warm-up.
    """

    name: ClassVar[str] = "loraprune"
    needs_calibration: ClassVar[bool] = False  # no hook statistics: the engine calls score_block
    needs_block_training: ClassVar[bool] = True

    def __init__(
        self, loraprune_steps: int = DEFAULT_STEPS, loraprune_rank: int = DEFAULT_RANK, loraprune_lr: float = DEFAULT_LR
    ) -> None:
        check_loraprune_options(loraprune_steps, loraprune_rank, loraprune_lr)
        self.steps = loraprune_steps
        self.rank = loraprune_rank
        self.lr = float(loraprune_lr)

    @property
    def options(self) -> dict[str, int | float]:
        return {"loraprune_steps": self.steps, "loraprune_rank": self.rank, "loraprune_lr": self.lr}

    def score_block(self, training: BlockTraining) -> dict[str, Tensor]:
        """Warm up LoRA adapters on the block objective under provisional masks; return the importance EMA.

        See the module docstring for the schedule. The adapters are removed afterwards (also when
        training fails), so the block leaves exactly as it came. See :meth:`Pruner.score_block`.
        """
        linears = training.linears
        shapes = {name: tuple(weight_as_out_in(module).shape) for name, module in linears.items()}
        device = weight_as_out_in(next(iter(linears.values()))).device
        ema = ImportanceEMA(shapes, device)
        wrappers = attach_scoring_adapters(training.block, linears, training.keep_masks, self.rank, training.seed)
        events = provisional_events(self.steps, PROVISIONAL_EVENTS)
        provisional = {name: mask.to(device=device, dtype=torch.bool) for name, mask in training.keep_masks.items()}

        def scores_now() -> dict[str, Tensor]:
            if ema.steps and any(bool((value > 0).any()) for value in ema.values.values()):
                return ema.values
            # no gradient signal yet (the block still reproduces its targets exactly, as block 0 does
            # before anything is pruned): the reference code's "magnitude" metric, |W + s B A|
            return {name: wrapper.adapted_weight().detach().abs() for name, wrapper in wrappers.items()}

        def set_provisional(fraction: float) -> None:  # nested: LoRAPrune never un-prunes
            chosen = training.select_masks(scores_now(), fraction, provisional)
            for name, wrapper in wrappers.items():
                provisional[name] = chosen[name]
                wrapper.keep_mask.copy_(chosen[name])

        def on_gradients(step: int) -> None:
            for name, wrapper in wrappers.items():
                if wrapper.lora_A.grad is None or wrapper.lora_B.grad is None:
                    continue  # the linear took no part in the loss (cannot happen in a block)
                gradient = lora_gradient_estimate(wrapper.lora_A, wrapper.lora_B, wrapper.lora_A.grad, wrapper.lora_B.grad)
                with torch.no_grad():
                    ema.update(name, lora_guided_importance(wrapper.adapted_weight(), gradient))
            ema.steps += 1
            if step + 1 in events:  # the provisional mask for the next steps
                set_provisional(events[step + 1])

        if 0 in events:
            set_provisional(events[0])
        params = [param for wrapper in wrappers.values() for param in (wrapper.lora_A, wrapper.lora_B)]
        try:
            training.train(params, steps=self.steps, lr=self.lr, batch_size=BATCH_SIZE, on_gradients=on_gradients)
        finally:
            detach_scoring_adapters(training.block, wrappers)
        for name, value in ema.values.items():
            if not bool(torch.isfinite(value).all()):
                raise RuntimeError(
                    f"loraprune: the importance of {name} is not finite (the warm-up diverged); lower --loraprune-lr"
                )
        # provisionally pruned weights score 0, below every kept one: the final mask nests in them
        return {name: value.masked_fill(~provisional[name], 0.0) for name, value in ema.values.items()}

    @torch.no_grad()
    def prune(
        self, weight: Tensor, stats: GivenScores | None, pattern: SparsityPattern, within: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Keep the highest LoRA-guided importance under ``pattern``. See :meth:`Pruner.prune`."""
        w = prepare_weight(weight, pattern)  # (out, in)
        keep_mask = select_keep_mask(self.importance(w, stats), pattern, within)  # (out, in)
        return apply_keep_mask(w, keep_mask), keep_mask

    def importance(self, weight: Tensor, stats: GivenScores | None) -> Tensor:
        """The scores :meth:`score_block` produced for this linear. See :meth:`Pruner.importance`."""
        if not isinstance(stats, GivenScores):
            raise ValueError(
                f"the loraprune pruner needs the scores of score_block() (GivenScores), got {type(stats).__name__}"
            )
        if tuple(stats.scores.shape) != tuple(weight.shape):
            raise ValueError(
                f"loraprune: scores of shape {tuple(stats.scores.shape)} for a weight of shape {tuple(weight.shape)}"
            )
        return stats.scores.to(device=weight.device, dtype=torch.float32)
