"""The trainer hooks of model-level LoRAPrune, and the driver that runs any model-level trainer with them.

A model-level trainer (the engine's streamed one, or a resident loop in a test) trains plain LoRA
adapters (``pruners.lowrank.LowRankLinear``, kind ``lora``) on every block linear on the causal-LM
loss, and calls three hooks:

- ``block_loaded(index, block)``: block ``index`` is materialised with its adapters, before its
  forward (and, streamed, before its recomputed forward in the backward pass). The hooks turn every
  adapter into LoRAPrune's masked form ``P * (W + s B A)`` (``provisional=True``) with the keep
  masks in force at the current step; the frozen weights stay untouched.
- ``block_gradients_ready(index, block)``: the adapters' gradients of this step are complete. The
  hooks compute each linear's ``|G * (W + s B A)|`` and hand it to the controller.
- ``step_done(step)``: optimizer step ``step`` (counted from 1) is applied. The controller records
  the schedule point, and adapters of blocks still materialised (a resident trainer) get the masks of
  the next step.

The trainer is a parameter (``train(hooks)``), so nothing here imports the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from torch import Tensor, nn

from pruners.loraprune import lora_gradient_estimate, lora_guided_importance
from pruners.loraprune_model import LoRAPruneController
from pruners.lowrank import LowRankLinear
from pruners.masks import select_keep_mask
from pruners.structured import HeadGroups, structured_count


def lora_adapter(block: nn.Module, name: str) -> LowRankLinear:
    """The plain LoRA adapter at path ``name`` of ``block``.

    Raises:
        ValueError: the module there is not a ``LowRankLinear`` of kind ``lora``.
    """
    module = block.get_submodule(name)
    if not isinstance(module, LowRankLinear) or module.kind != "lora":
        raise ValueError(f"loraprune: {name} must carry a plain LoRA adapter during training, found {type(module).__name__}")
    return module


def step_importance(adapter: LowRankLinear) -> Tensor:
    """``(out, in)`` float32 ``|G * (W + s B A)|`` of one adapter from its current gradients.

    Raises:
        RuntimeError: the adapter has no gradients (the trainer called the hook too early).
    """
    if adapter.lora_A.grad is None or adapter.lora_B.grad is None:
        raise RuntimeError("loraprune: block_gradients_ready came before the adapters had gradients")
    gradient = lora_gradient_estimate(adapter.lora_A, adapter.lora_B, adapter.lora_A.grad, adapter.lora_B.grad)
    return lora_guided_importance(adapter.adapted_weight().detach(), gradient)  # (out, in)


class LoRAPruneHooks:
    """Connects a model-level LoRA trainer to a :class:`LoRAPruneController`.

    A streamed trainer loads every block twice a step, and each load gets the masks of the step.
    A resident trainer loads each block once, so at ``step_done`` the hooks give the adapters of
    the blocks still materialised the masks of the next step (a released block, whose weights are
    back on ``meta``, is forgotten: holding its masks would make memory grow with depth).

    Args:
        controller: the importance, masks and schedule of every block.
        start_step: the number of steps already taken (a resumed trainer).
    """

    def __init__(self, controller: LoRAPruneController, start_step: int = 0) -> None:
        self.controller = controller
        self.step = start_step  # the step being trained, from 0
        self.live: dict[int, dict[str, LowRankLinear]] = {}  # adapters of blocks that may still be materialised

    def block_loaded(self, index: int, block: nn.Module) -> None:
        """Give every adapter of block ``index`` LoRAPrune's masked forward with the masks of this step."""
        names = self.controller.layouts[index].shapes
        self.live[index] = {name: lora_adapter(block, name) for name in names}
        self._apply(index)

    def _apply(self, index: int) -> None:
        masks = self.controller.keep_masks(index, self.step)
        for name, adapter in self.live[index].items():
            adapter.provisional = True
            adapter.keep_mask = masks[name].to(adapter.lora_A.device)  # a new buffer: autograd's saved tensors stay valid

    def block_gradients_ready(self, index: int, block: nn.Module) -> None:
        """Fold this step's importance of block ``index`` into the controller."""
        names = self.controller.layouts[index].shapes
        importance = {name: step_importance(lora_adapter(block, name)) for name in names}
        self.controller.accumulate(index, self.step, importance)

    def step_done(self, step: int) -> None:
        """Optimizer step ``step`` (counted from 1, as the trainer counts) is applied; masks move to the next step."""
        self.controller.step_done(step - 1)
        self.step = step
        for index in list(self.live):
            if any(adapter.base.weight.device.type == "meta" for adapter in self.live[index].values()):
                del self.live[index]  # released: its next load applies the masks
            else:
                self._apply(index)


def prune_while_training(train: Callable[[LoRAPruneHooks], None], controller: LoRAPruneController,
                         hooks: LoRAPruneHooks | None = None) -> list[dict[str, Tensor]]:
    """Run ``train(hooks)`` with LoRAPrune's hooks and return every block's final keep masks.

    Args:
        train: a model-level trainer of ``controller.schedule.total_steps`` steps that calls the
            hooks' ``block_loaded``, ``block_gradients_ready`` and ``step_done`` (see the module docstring).
        controller: the importance, masks and schedule of every block.
        hooks: the hooks to pass (default: ``LoRAPruneHooks(controller)``; a caller may subclass them).

    Returns:
        One ``{name: (out, in) bool keep mask}`` per block, exactly at the block's target pattern.
    """
    train(hooks or LoRAPruneHooks(controller))
    return list(iter_final_masks(controller))


def iter_final_masks(controller: LoRAPruneController) -> Iterator[dict[str, Tensor]]:
    """Every block's final keep masks, checked at its target, one block at a time (in block order).

    A caller that writes each block's masks before taking the next holds one block's masks (a byte
    per weight for per-weight patterns), not the model's.
    """
    for index in range(len(controller.layouts)):
        masks = controller.final_masks(index)
        check_at_target(controller, index, masks)
        yield masks


def check_at_target(controller: LoRAPruneController, index: int, masks: dict[str, Tensor]) -> None:
    """Assert (an internal invariant) that block ``index``'s masks meet its target pattern exactly."""
    layout = controller.layouts[index]
    pattern = layout.pattern
    if layout.groups is None:
        for name, mask in masks.items():  # a mask at the exact counts is the one selection of itself
            assert select_keep_mask(mask.float(), pattern).equal(mask), f"block {index} {name}: not at {pattern.label}"
        return
    groups = layout.groups
    side = groups.output if isinstance(groups, HeadGroups) else groups.down
    total = groups.num_heads if isinstance(groups, HeadGroups) else groups.channels
    width = masks[side].shape[1] // total
    removed = int((~masks[side][0]).sum()) // width
    assert removed == structured_count(total, pattern.sparsity), f"block {index}: {removed} groups removed, not {pattern.label}"
