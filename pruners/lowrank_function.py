"""The adapted linear of ``LowRankLinear`` as one autograd function, at the cost of its arithmetic.

Autograd through ``F.linear(x, W + delta(A, B))`` rebuilds the effective weight at every call (every
micro-batch of a step, every evaluation forward) and allocates each intermediate of the weight-sized
chain, forward and backward: the product ``B A``, its scaled and masked copies, the weight's gradient
and its masked and scaled copies. On a host whose large allocations are each their own mapping (the
command line sets glibc's mmap threshold, ``reconstruct/host_allocator.py``) every one of those is
also a round of page faults. :class:`AdaptedLinear` computes the same numbers with the same kernel calls
in the same order, so its output and its gradients are autograd's bit for bit
(``tests/methods/test_lowrank_function.py``), but

- builds the effective weight once per version of (A, B, the weight, the mask) and reuses it across
  micro-batches and evaluation forwards, rewritten in place at the next version when no graph still
  holds the old one (a graph not yet backpropagated keeps its own copy);
- writes ``B A`` and the weight's gradient into the scratch tensor of a :class:`Workspace` (one per
  block, or one for a whole retraining: the size of the largest linear), so a step allocates no
  weight-sized tensor but the effective weight;
- applies the mask and the scale to the weight's gradient in place.

The masked low-rank update cannot be factored through the activations (``(M ⊙ B A) x`` is not
``B (A x)`` masked), so the dense ``W + M ⊙ s B A`` is built: once per step it costs one rank-r product
and three passes over the weight, against the three weight-sized products of every micro-batch.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor


class Workspace:
    """A scratch tensor reused from call to call (one per dtype and device); share one among many adapters.

    A scratch tensor is only used inside one call (the merge, one backward), so adapters that never run
    at the same time can share it: the wrappers of a block, or of every block of a retraining.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, Tensor] = {}
        self._spares: dict[tuple, list[Tensor]] = {}  # effective weights given back, by (shape, strides, dtype, device)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A contiguous tensor of that shape, dtype and device (its values are whatever was there).

        One buffer per dtype and device, as large as the largest shape asked for: every call returns a
        view of it, so the caller must be done with the last one (the merge and each backward are).
        """
        key = (dtype, torch.device(device))
        numel = math.prod(shape)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)

    def give_back(self, tensor: Tensor) -> None:
        """Keep a tensor no one uses any more (an adapter's effective weight) for :meth:`spare`."""
        self._spares.setdefault(_layout_key(tensor), []).append(tensor)

    def spare(self, like: Tensor) -> Tensor | None:
        """A tensor given back with ``like``'s shape, strides, dtype and device, or None.

        A streamed retraining loads a block's adapters anew at every load: their effective weights come
        from here instead of fresh memory (on a host where each large allocation is its own mapping, a
        fresh one costs a page fault per 4 KiB, more than the arithmetic that fills it).
        """
        spares = self._spares.get(_layout_key(like))
        return spares.pop() if spares else None

    def clear(self) -> None:
        """Drop every scratch and spare tensor."""
        self._buffers.clear()
        self._spares.clear()


def _layout_key(tensor: Tensor) -> tuple:
    return tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device


def _mm(a: Tensor, b: Tensor, workspace: Workspace) -> Tensor:
    """``a @ b`` (2-D), written into the workspace's scratch tensor."""
    return torch.mm(a, b, out=workspace.take((a.shape[0], b.shape[1]), torch.result_type(a, b), a.device))


def _mask_bytes(module) -> Tensor:
    """The keep mask read as ``uint8`` 0/1: ``x.mul_(it)`` has the values of ``x * keep_mask``.

    Torch converts a bool operand one element at a time (into a new weight-sized tensor, for an
    in-place product), 10-20 times slower than a ``uint8`` one, which it converts as it goes.
    """
    return module.keep_mask.view(torch.uint8)


def _column_major(t: Tensor) -> bool:
    """What autograd's ``mm`` backward asks of an operand: stored column by column (it then transposes)."""
    return t.stride(0) == 1 and t.stride(1) == t.shape[0]


@torch.no_grad()
def effective_weight_of(module, out: Tensor | None = None) -> Tensor:
    """``LowRankLinear.effective_weight()``'s value by the same arithmetic, ``B A`` in scratch; into ``out`` if given.

    Bit for bit: ``B @ A``, then ``* s`` and ``* M`` (masklora) or ``- 1`` and ``* W`` (scalelora) in place
    (the same elementwise products), cast to the weight's dtype, and ``W + delta`` (``out``, when given,
    must be a tensor this function returned for the same module: its strides are those of ``W + delta``).
    """
    weight = module.base_weight()  # (out, in)
    product = _mm(module.lora_B, module.lora_A, module.workspace)  # (out, in)
    if product.dtype != torch.float32:
        product = product.float()
    if module.kind == "scalelora":
        product.sub_(1.0).mul_(weight.float())
    else:
        product.mul_(module.scaling)
        if module.kind == "masklora":
            product.mul_(_mask_bytes(module))
    if weight.dtype != product.dtype:
        product = product.to(weight.dtype)
    return torch.add(weight, product) if out is None else torch.add(weight, product, out=out)


def linear_input_gradient(grad_output: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """``d loss / d x`` of ``F.linear(x, weight)`` as autograd computes it (``mm`` backward of ``x @ weight.T``)."""
    grad = grad_output.reshape(-1, grad_output.shape[-1])  # (N, out)
    rows = x.reshape(-1, x.shape[-1])  # (N, in): what the forward multiplied
    if _column_major(rows):
        result = weight.t().mm(grad.t()).t()
    else:
        result = grad.mm(weight)
    return result.reshape(x.shape)


def adapter_gradients(module, grad_output: Tensor, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(d loss / d A, d loss / d B)`` through ``weight = W + delta(A, B)``, as autograd computes them.

    The weight's gradient goes into the workspace's scratch; the mask and the scale are applied to it
    in place (masklora: ``* M`` then ``* s``, the order autograd unwinds ``(B A * s) * M``).
    """
    grad = grad_output.reshape(-1, grad_output.shape[-1])  # (N, out)
    rows = x.reshape(-1, x.shape[-1])  # (N, in)
    if _column_major(weight.t()):  # autograd's mm backward of x @ weight.T for the second operand
        grad_weight = _mm(grad.t(), rows, module.workspace)  # (out, in)
    else:
        grad_weight = _mm(rows.t(), grad, module.workspace).t()
    a, b = module.lora_A, module.lora_B
    if grad_weight.dtype != torch.float32:  # the cast of delta to the weight's dtype, unwound
        grad_weight = grad_weight.float()
    if module.kind == "scalelora":
        grad_weight.mul_(module.base_weight().float())
    else:
        if module.kind == "masklora":
            grad_weight.mul_(_mask_bytes(module))
        grad_weight.mul_(module.scaling)
    if a.dtype != torch.float32:  # the .float() of B @ A, unwound
        grad_weight = grad_weight.to(a.dtype)
    grad_b = a.mm(grad_weight.t()).t() if _column_major(b) else grad_weight.mm(a.t())
    grad_a = grad_weight.t().mm(b).t() if _column_major(a) else b.t().mm(grad_weight)
    return grad_a, grad_b


class AdaptedLinear(torch.autograd.Function):
    """``F.linear(x, module's effective weight, bias)`` with gradients for x, A and B (the weight and bias frozen)."""

    @staticmethod
    def forward(ctx, x: Tensor, lora_a: Tensor, lora_b: Tensor, module) -> Tensor:
        weight = module.current_weight()
        ctx.module = module
        # versions checked: a tensor changed before the backward raises, as under autograd, including
        # what the backward reads besides (masklora: the mask; scalelora: the base weight)
        ctx.save_for_backward(x, lora_a, lora_b, weight, module.keep_mask if module.kind == "masklora" else None,
                              module.base.weight if module.kind == "scalelora" else None)
        module.pending_graphs.add(ctx)
        return F.linear(x, weight, module.base.bias)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        x, _, _, weight, _, _ = ctx.saved_tensors
        module = ctx.module
        module.pending_graphs.discard(ctx)  # the weight may be rewritten in place from now on
        grad_x = linear_input_gradient(grad_output, x, weight) if ctx.needs_input_grad[0] else None
        grad_a = grad_b = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_a, grad_b = adapter_gradients(module, grad_output, x, weight)
        return grad_x, grad_a, grad_b, None


class WeightCache:
    """The effective weight of one adapter, valid for one version of what it is computed from."""

    def __init__(self) -> None:
        self.weight: Tensor | None = None
        self.key: tuple | None = None
        self.pending_graphs: weakref.WeakSet = weakref.WeakSet()  # forwards whose backward has not run

    def get(self, module, key: tuple) -> Tensor:
        """The cached weight if ``key`` matches, else rebuilt in place when no pending graph holds it
        (the first time: into a spare of the workspace, if it has one)."""
        if self.weight is None or self.key != key:
            if self.weight is None:
                reuse = module.workspace.spare(module.base_weight())
            else:
                reuse = self.weight if not self.pending_graphs else None
            self.weight = effective_weight_of(module, reuse)
            self.key = key
        return self.weight

    def clear(self, workspace: Workspace | None = None) -> None:
        """Forget the weight; give it to ``workspace``'s spares when no pending graph holds it."""
        if self.weight is not None and workspace is not None and not self.pending_graphs:
            workspace.give_back(self.weight)
        self.weight, self.key = None, None
