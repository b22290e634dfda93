"""The one low-rank adapter that wraps a frozen linear layer: MaskLoRA, ScaleLoRA, LoRA (and LoRAPrune's).

All three are written as ``W_eff = W + delta`` with ``delta`` computed in float32 from the adapter
factors ``B: (out, r)`` and ``A: (r, in)`` and cast to the weight dtype (in bf16/fp16 blocks the
factors stay float32 and only the sum is rounded):

- ``lora``:      ``delta = s B A``, ``s = alpha / r``   (dense: fills the pruned positions when merged)
- ``masklora``:  ``delta = M ⊙ (s B A)``               (M = keep mask; pruned zeros stay exactly 0)
- ``scalelora``: ``delta = W ⊙ (B A - 1)``, i.e. ``W_eff = W ⊙ (B A)``   (zeros of W stay 0)

LoRA and MaskLoRA use peft's init: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0,
so the wrapped layer starts exactly at the pruned layer. A is drawn from a CPU ``torch.Generator`` so
the init is the same on every device and every run.

ScaleLoRA is PERP's form exactly (ZIB-IOL/PERP ``customLayers.py``): the kept weights are multiplied
elementwise by the low-rank matrix ``B A``, with A and B filled with ``1/sqrt(r)`` so that ``B A`` is
the all-ones matrix at the start; alpha is not used. We keep PERP's form rather than the additive
``W ⊙ (1 + s B A)`` with a LoRA init because it learns much faster at PERP's lr: on a 50%-pruned
SmolLM2-135M block, 40 steps of 2 samples took the block MSE to 0.78x (PERP form) vs 0.95x
(``1 + s B A``, peft init). Two caveats of the form, both PERP's: the constant init makes every rank component receive
the same gradient, so the adapter trains as a rank-1 rescaling ``u v^T`` whatever r is (breaking the
symmetry with zero-sum noise gained ~1% MSE in our test, so we do not); and weight decay pulls the
multiplier towards 0, i.e. towards deleting the layer, so keep weight_decay at 0 (the default).

LoRAPrune (``pruners.loraprune``) scores weights with a plain ``lora`` adapter whose keep mask is
*provisional* (``provisional=True``): its forward is LoRAPrune's ``P ⊙ (W + s B A)``, computed in float32
and cast to the input's dtype, and the pruner moves ``P`` while it trains; it is never merged. This
module lives in ``pruners/`` so that both the pruner and ``reconstruct.methods`` can import it.

``nn.Linear`` stores its weight as (out, in); ``transformers.pytorch_utils.Conv1D`` as (in, out) and
computes ``x @ W + b``. The wrapper works on the (out, in) view in both cases; keep masks are (out, in).

The forward of a non-provisional adapter runs through ``pruners.lowrank_function.AdaptedLinear``: the
same arithmetic as ``F.linear(x, effective_weight(), bias)`` under autograd, bit for bit, with the
effective weight built once per version of the parameters and the backward's weight-sized work in
reused scratch. Change A, B, the weight or the mask through torch ops (``copy_``, an optimizer step:
they bump the tensor's version); a write through ``.data`` is invisible to it (call
``forget_weight()`` after one).
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pruners.layers import is_conv1d, weight_as_out_in
from pruners.lowrank_function import AdaptedLinear, WeightCache, Workspace


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed for adapter init: stable across runs, processes and devices."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def init_lora_a(rank: int, in_features: int, seed: int) -> Tensor:
    """peft's LoRA A init, drawn on the CPU from ``seed``: U(-1/sqrt(in), 1/sqrt(in)), shape (r, in)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform with a = sqrt(5)
    return (torch.rand(rank, in_features, generator=generator, dtype=torch.float32) * 2 - 1) * bound


class LowRankLinear(nn.Module):
    """A frozen ``nn.Linear``/``Conv1D`` plus a trainable rank-r adapter (kind: masklora, scalelora, lora).

    Args:
        base: the layer to wrap; its parameters stay frozen and untouched until ``merged_weight`` is
            committed by the caller.
        keep_mask: bool (out, in), True = weight survives pruning.
        kind: "masklora", "scalelora" or "lora" (see the module docstring for the three forms).
        rank: adapter rank r.
        alpha: scaling numerator; lora/masklora multiply B A by alpha / rank (scalelora ignores it).
        seed: seed of A's init (lora/masklora; scalelora's init is constant).
        param_dtype: dtype of A and B (float32 whatever the block's dtype).
        provisional: LoRAPrune's scoring adapter (kind "lora"): ``keep_mask`` is a copy the caller
            may change while training, and the forward is ``keep_mask ⊙ (W + s B A)`` in float32.
        workspace: scratch tensors to share with other adapters that never run at the same time (the
            wrappers of a block, of a model); default: the adapter's own.
        factors: ``(A, B)`` Parameters to use as they are instead of initialising new ones (a caller that
            keeps them between loads of the layer: model-level retraining).
    """

    def __init__(
        self,
        base: nn.Module,
        keep_mask: Tensor,
        *,
        kind: str,
        rank: int,
        alpha: float,
        seed: int,
        param_dtype: torch.dtype = torch.float32,
        provisional: bool = False,
        workspace: Workspace | None = None,
        factors: tuple[nn.Parameter, nn.Parameter] | None = None,
    ) -> None:
        super().__init__()
        self.workspace = workspace if workspace is not None else Workspace()
        self._weight_cache = WeightCache()
        if kind not in ("masklora", "scalelora", "lora"):
            raise ValueError(f"unknown low-rank adapter kind {kind!r}")
        self.base = base
        self.kind = kind
        weight = weight_as_out_in(base)
        out_features, in_features = weight.shape
        device = weight.device
        self.provisional = provisional
        mask = keep_mask.to(device=device, dtype=torch.bool)
        self.register_buffer("keep_mask", mask.clone() if provisional else mask, persistent=False)
        self.scaling = 1.0 if kind == "scalelora" else alpha / rank  # PERP's scalelora: no alpha scaling
        if factors is not None:
            if tuple(factors[0].shape) != (rank, in_features) or tuple(factors[1].shape) != (out_features, rank):
                raise ValueError(f"factors of shapes {tuple(factors[0].shape)}, {tuple(factors[1].shape)} do not fit a "
                                 f"rank-{rank} adapter of a ({out_features}, {in_features}) weight")
            self.lora_A, self.lora_B = factors
            return
        if kind == "scalelora":  # PERP: B A = all ones at the start
            a = torch.full((rank, in_features), 1.0 / math.sqrt(rank))
            b = torch.full((out_features, rank), 1.0 / math.sqrt(rank))
        else:  # peft LoRA init: the adapter starts at zero
            a = init_lora_a(rank, in_features, seed)
            b = torch.zeros(out_features, rank)
        self.lora_A = nn.Parameter(a.to(device=device, dtype=param_dtype))  # (r, in)
        self.lora_B = nn.Parameter(b.to(device=device, dtype=param_dtype))  # (out, r)

    # Attributes some attention code reads from its projections (e.g. ``q_proj.weight.dtype``).
    @property
    def weight(self) -> Tensor:
        """The base layer's weight (stored layout: (in, out) for ``Conv1D``)."""
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        """The base layer's bias, or None."""
        return self.base.bias

    def base_weight(self) -> Tensor:
        """The base layer's weight as (out, in) (a transposed view for ``Conv1D``)."""
        return weight_as_out_in(self.base)

    def current_weight(self) -> Tensor:
        """``effective_weight()``'s value, no graph, computed once per version of A, B, the weight and the mask."""
        key = tuple((id(t), t._version, t.data_ptr())
                    for t in (self.lora_A, self.lora_B, self.base.weight, self.keep_mask))
        return self._weight_cache.get(self, key)

    @property
    def pending_graphs(self):
        """The forwards whose backward has not run yet (they hold the current weight)."""
        return self._weight_cache.pending_graphs

    def forget_weight(self) -> None:
        """Drop the cached effective weight (after a change it cannot see), giving it to the workspace's spares."""
        self._weight_cache.clear(self.workspace)

    def _exact_function_applies(self, x: Tensor) -> bool:
        """Whether ``AdaptedLinear`` computes this call: frozen weight and bias, x of 2 or more dims, no inference mode."""
        bias = self.base.bias
        return (not self.base.weight.requires_grad and (bias is None or not bias.requires_grad) and x.dim() >= 2
                and not torch.is_inference_mode_enabled())

    def delta(self) -> Tensor:
        """The adapter's change of the (out, in) weight, float32."""
        product = (self.lora_B @ self.lora_A).float()  # (out, in)
        if self.kind == "scalelora":
            return (product - 1.0) * weight_as_out_in(self.base).float()
        update = product * self.scaling
        if self.kind == "masklora":
            update = update * self.keep_mask
        return update

    def effective_weight(self) -> Tensor:
        """``W + delta`` as (out, in), in the weight's dtype; differentiable in A and B."""
        weight = weight_as_out_in(self.base)
        return weight + self.delta().to(weight.dtype)

    def adapted_weight(self) -> Tensor:
        """``W + s B A``, (out, in) float32, differentiable in A and B (LoRAPrune's unmasked weight)."""
        return weight_as_out_in(self.base).float() + self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: Tensor) -> Tensor:
        """The adapted linear: (..., in) -> (..., out)."""
        if self.provisional:  # LoRAPrune: a provisionally pruned weight goes with its adapter update
            weight = self.adapted_weight() * self.keep_mask  # (out, in) float32
            return F.linear(x, weight.to(x.dtype), self.base.bias)
        if self._exact_function_applies(x):
            return AdaptedLinear.apply(x, self.lora_A, self.lora_B, self)
        return F.linear(x, self.effective_weight(), self.base.bias)

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """The weight to commit, (out, in), a new tensor. Sparsity-preserving kinds re-apply the mask."""
        merged = self.effective_weight().detach().clone()
        zero = torch.zeros((), dtype=merged.dtype, device=merged.device)
        if self.kind != "lora":
            merged = torch.where(self.keep_mask, merged, zero)
        # A kept non-zero weight whose update cancels it exactly (W + delta rounds to 0, likely in bf16)
        # would add a zero the pruner did not choose: keep it at the smallest normal value of its sign,
        # so the sparsity pattern stays exactly the pruner's. This guard lives in the compute dtype; the
        # cast to the checkpoint's dtype (float32 tiny is 0 in float16) is guarded when the block is
        # written (block_io.keep_nonzero_when_stored, for every method).
        base = weight_as_out_in(self.base)
        vanished = (merged == 0) & (base != 0) & self.keep_mask
        tiny = torch.full((), torch.finfo(merged.dtype).tiny, dtype=merged.dtype, device=merged.device)
        return torch.where(vanished, torch.copysign(tiny, base), merged)

    @torch.no_grad()
    def commit(self, merged: Tensor) -> None:
        """Write an (out, in) merged weight into the base layer in place (its Parameter object stays)."""
        weight = self.base.weight
        weight.copy_(merged.t() if is_conv1d(self.base) else merged)

    def extra_repr(self) -> str:
        r = self.lora_A.shape[0]
        return f"kind={self.kind}, rank={r}, scaling={self.scaling:g}" + (", provisional" if self.provisional else "")


def swap_module(block: nn.Module, name: str, expected: nn.Module, replacement: nn.Module) -> None:
    """Put ``replacement`` at path ``name`` in ``block``, where ``expected`` must be now.

    Raises:
        ValueError: the module at ``name`` is not ``expected``.
    """
    parent_name, _, attr = name.rpartition(".")
    parent = block.get_submodule(parent_name)
    if getattr(parent, attr) is not expected:
        raise ValueError(f"linears[{name!r}] is not the module at that path in the block")
    setattr(parent, attr, replacement)
