"""A bit-exact copy of a block's parameters, to undo a repair that did not help.

The guard (``ReconSpec.guard``) takes a :class:`BlockSnapshot` before a method is attached and, when
the merged block is not better on the validation samples than the pruned one, restores it: the same
parameter objects, in the same order, with the same bytes; a bias that the method added is gone again.
"""

from __future__ import annotations

from torch import Tensor, nn


class BlockSnapshot:
    """Every module's parameter slots and a CPU copy of their values.

    Args:
        block: the block, before ``attach_method``.
    """

    def __init__(self, block: nn.Module) -> None:
        self.entries: list[tuple[nn.Module, dict[str, nn.Parameter | None], dict[str, Tensor]]] = []
        for module in block.modules():
            slots = dict(module._parameters)  # name → Parameter or None (e.g. a Linear without bias), in order
            values = {name: p.detach().to("cpu", copy=True) for name, p in slots.items() if p is not None}
            self.entries.append((module, slots, values))

    def restore(self) -> None:
        """Put back every parameter slot as it was when the snapshot was taken, bit for bit."""
        for module, slots, values in self.entries:
            for name in list(module._parameters):
                if name not in slots:
                    del module._parameters[name]
            for name, param in slots.items():
                if param is not None:
                    param.data.copy_(values[name].to(param.device))
                module._parameters.pop(name, None)
                module._parameters[name] = param  # re-inserted in the recorded order
