"""Training biases and normalisation parameters in place (the methods bias, ln, bias-ln).

PERP trains the biases of every linear layer and the weights and biases of every LayerNorm/RMSNorm.
To train in float32 inside a bf16/fp16 block, each trained tensor gets a float32 *master* Parameter;
a forward pre-hook puts ``master.to(module dtype)`` on the module as a plain attribute before every
call, so the block runs in its own dtype while AdamW updates the float32 master. The module's own
Parameter is taken out of ``module._parameters`` meanwhile and is only written when the merge commits
(or put back unchanged on ``discard``), so a failed merge leaves it untouched.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pruners.layers import weight_as_out_in


def find_norms(block: nn.Module) -> dict[str, nn.Module]:
    """Normalisation modules of a block, found generically.

    A module counts when its class name contains "Norm" (LayerNorm, LlamaRMSNorm, Qwen3RMSNorm, ...)
    and it has a tensor ``weight`` (LayerNorm without affine parameters has ``weight = None``).

    Returns:
        Qualified name relative to the block -> module, in ``named_modules`` order.
    """
    return {
        name: module
        for name, module in block.named_modules()
        if "Norm" in type(module).__name__ and isinstance(getattr(module, "weight", None), Tensor)
    }


class MasterParam:
    """A float32 trainable master copy of one module tensor, cast to the module's dtype at each call.

    Args:
        module: the module that owns (or will own) the tensor.
        attr: the attribute name, "weight" or "bias".
        name: qualified name for messages, e.g. "self_attn.q_proj.bias".
        new_bias_of: for a bias the module lacks (``module.bias is None``), the (out, in) weight view
            that gives its length, dtype and device; the master starts at zeros.
        param_dtype: dtype of the master (float32).
        order: the module's parameter names in their original order (pass it when several tensors of
            one module get masters, so the restore puts them back in that order).
    """

    def __init__(
        self,
        module: nn.Module,
        attr: str,
        name: str,
        *,
        new_bias_of: Tensor | None = None,
        param_dtype: torch.dtype = torch.float32,
        order: list[str] | None = None,
    ) -> None:
        self.module = module
        self.attr = attr
        self.name = name
        self.original: nn.Parameter | None = module._parameters.get(attr)
        if self.original is None:
            if new_bias_of is None:
                raise ValueError(f"{name}: the module has no {attr!r} parameter to train")
            self.dtype = new_bias_of.dtype
            initial = torch.zeros(new_bias_of.shape[0], device=new_bias_of.device, dtype=param_dtype)
        else:
            self.dtype = self.original.dtype
            initial = self.original.detach().to(param_dtype, copy=True)
        self.is_new = self.original is None
        self.master = nn.Parameter(initial)
        self._order = list(order) if order is not None else list(module._parameters)
        module._parameters.pop(attr, None)
        self._hook = module.register_forward_pre_hook(self._inject)
        self._inject(module, ())

    def _inject(self, module: nn.Module, args: tuple) -> None:
        module.__dict__[self.attr] = self.master.to(self.dtype)  # differentiable cast, plain attribute

    @torch.no_grad()
    def value(self) -> Tensor:
        """The tensor a merge would commit, in the module's dtype (a new tensor)."""
        return self.master.detach().to(self.dtype, copy=True)

    @torch.no_grad()
    def restore(self, value: Tensor | None) -> None:
        """Remove the hook and put a Parameter back: ``value`` written in place, or the original if None."""
        self._hook.remove()
        self.module.__dict__.pop(self.attr, None)
        if value is None:
            param = self.original
        elif self.original is not None:
            self.original.copy_(value)
            param = self.original
        else:
            param = nn.Parameter(value, requires_grad=False)
        params = self.module._parameters
        if param is not None or self.attr in self._order:
            params[self.attr] = param
        ordered = [k for k in self._order if k in params] + [k for k in params if k not in self._order]
        items = [(k, params[k]) for k in ordered]
        params.clear()  # put the keys back in their original order, so state_dict order is unchanged
        params.update(items)


def bias_masters(
    linears: dict[str, nn.Module], bias_linears: set[str], param_dtype: torch.dtype
) -> dict[str, MasterParam]:
    """Masters for the biases of the linears: existing ones, plus zero-initialised ones on bias_linears.

    Returns:
        "<linear>.bias" -> MasterParam, in the order of ``linears``.
    """
    masters = {}
    for name, linear in linears.items():
        if linear.bias is None and name not in bias_linears:
            continue
        masters[f"{name}.bias"] = MasterParam(
            linear, "bias", f"{name}.bias", new_bias_of=weight_as_out_in(linear), param_dtype=param_dtype
        )
    return masters


def norm_masters(block: nn.Module, param_dtype: torch.dtype) -> dict[str, MasterParam]:
    """Masters for the weight (and bias, if any) of every normalisation module of the block."""
    masters = {}
    for name, norm in find_norms(block).items():
        order = list(norm._parameters)
        for attr in ("weight", "bias"):
            if isinstance(norm._parameters.get(attr), Tensor):
                key = f"{name}.{attr}" if name else attr
                masters[key] = MasterParam(norm, attr, key, param_dtype=param_dtype, order=order)
    return masters


BIAS_METHODS = ("bias", "bias-ln")  # the methods that may give a linear a bias it did not have


@torch.no_grad()
def add_zero_biases(linears: dict[str, nn.Module], bias_linears: set[str]) -> list[str]:
    """Give every linear in ``bias_linears`` that has no bias a zero one (the weight's dtype and device).

    A config flag (``attention_bias``, ``mlp_bias``) switches a bias on in every block, so a block whose
    repair was undone, or never trained, must carry the bias too: as zeros it changes no output.

    Returns:
        The linears given a bias, in the order of ``linears``.
    """
    added = []
    for name, linear in linears.items():
        if name in bias_linears and linear.bias is None:
            weight = weight_as_out_in(linear)
            linear.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),
                                       requires_grad=False)
            added.append(name)
    return added
