"""Stacked mixture-of-experts weights as one ``nn.Linear`` per expert and projection.

transformers 5 keeps the experts of Mixtral, Qwen3-MoE and their kin in 3-D parameters
(``experts.gate_up_proj`` of shape (E, 2I, H), ``experts.down_proj`` of shape (E, H, I)), while their
checkpoints store one tensor per expert and projection (``experts.0.gate_proj.weight``, or Mixtral's
``experts.0.w1.weight``) and transformers converts between the two when it loads and saves.

The engine prunes and repairs ``nn.Linear`` modules, so when it builds a skeleton it swaps each such
experts module for :class:`ExpertList`: one :class:`ExpertMLP` per expert whose linears carry the
checkpoint's own names. The checkpoint's per-expert tensors then load into them one to one and are
written back under the same names (which stock transformers converts into its stacked layout on
load); statistics hooks see only the tokens the router sends to each expert; masks and adapters are
per expert weight. The router (``mlp.gate``) is left as it is: it is not pruned.

The forward is transformers' eager experts forward (the hit-expert loop, ``index_add_`` in the same
order), with one difference: the gate and up projections are two matmuls instead of one matmul of
the concatenated weight followed by a split. Each output element is the same dot product either way;
only the order a matmul kernel sums it in may differ (rounding, not arithmetic). transformers' other
experts implementations (``grouped_mm``, the default; ``batched_mm``) round differently again; the
engine always computes the eager form, in-memory and streamed alike.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from reconstruct.modelio.conversions import model_conversions

STACKED_NAMES = ("gate_up_proj", "down_proj")  # the 3-D parameters of a stacked experts module
# transformers' experts-implementation attributes, at the one layout ExpertList computes
EAGER_LAYOUT = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
                "has_post_expert_norm": False}


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``, its linears named as the checkpoint names them."""

    def __init__(self, names: tuple[str, str, str], hidden: int, intermediate: int, act_fn: nn.Module,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.gate_name, self.up_name, self.down_name = names
        for name, (n_in, n_out) in zip(names, ((hidden, intermediate), (hidden, intermediate), (intermediate, hidden))):
            self.add_module(name, nn.Linear(n_in, n_out, bias=False, dtype=dtype, device=device))
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (t, H) → (t, H)."""
        gate = getattr(self, self.gate_name)(x)  # (t, I)
        up = getattr(self, self.up_name)(x)  # (t, I)
        return getattr(self, self.down_name)(self.act_fn(gate) * up)  # (t, H)


class ExpertList(nn.ModuleList):
    """The experts of one MoE block, called as transformers calls its stacked experts module."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """``hidden_states`` (t, H), ``top_k_index`` (t, k), ``top_k_weights`` (t, k) → (t, H).

        Each token's output is the routing-weighted sum of its experts' outputs, added expert by
        expert in index order, as transformers' eager forward adds them.
        """
        n_experts = len(self)
        final = torch.zeros_like(hidden_states)  # (t, H)
        if hidden_states.is_meta:
            return self._even_routing(hidden_states, top_k_weights, final)
        with torch.no_grad():
            expert_mask = nn.functional.one_hot(top_k_index, num_classes=n_experts + 1)  # (t, k, E+1)
            expert_mask = expert_mask.permute(2, 1, 0)  # (E+1, k, t)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()  # (hit, 1)
        for expert_index in expert_hit:
            index = int(expert_index[0])
            if index == n_experts:  # the "no expert" slot of expert-parallel masking
                continue
            top_k_pos, token_index = torch.where(expert_mask[index])  # (n,), (n,)
            routed = self[index](hidden_states[token_index])  # (n, H)
            routed = routed * top_k_weights[token_index, top_k_pos, None]  # (n, H)
            final.index_add_(0, token_index, routed.to(final.dtype))
        return final

    def _even_routing(self, hidden_states: torch.Tensor, top_k_weights: torch.Tensor,
                      final: torch.Tensor) -> torch.Tensor:
        """On ``meta`` (the memory planner's trace), where routing is unknowable: each expert takes an even
        share, ceil(t k / E), of the t k routed tokens: the expected load, the sizes the trace measures."""
        n_tokens, top_k = top_k_weights.shape
        share = min(n_tokens, -(-n_tokens * top_k // len(self)))
        token_index = torch.arange(share, device=hidden_states.device)  # (n,)
        for expert in self:
            routed = expert(hidden_states[token_index]) * top_k_weights[token_index, 0, None]  # (n, H)
            final.index_add_(0, token_index, routed.to(final.dtype))
        return final


def is_stacked_experts(module: nn.Module) -> bool:
    """True for a module holding its experts' projections as 3-D ``gate_up_proj`` / ``down_proj`` parameters."""
    params = dict(module.named_parameters(recurse=False))
    return all(name in params and params[name].dim() == 3 for name in STACKED_NAMES)


def per_expert_names(model: nn.Module) -> tuple[str, str, str] | None:
    """The checkpoint's names of an expert's gate, up and down linears, from transformers' conversions.

    ``("gate_proj", "up_proj", "down_proj")`` for Qwen3-MoE, ``("w1", "w3", "w2")`` for Mixtral; None
    when transformers converts no per-expert tensors into stacked ones for this model.
    """
    gate = up = down = None
    per_expert = re.compile(r"experts\.\*\.(\w+)\.weight$")
    for sources, targets in model_conversions(model).tensor_conversions:
        names = [per_expert.search(source) for source in sources]
        if not all(names):
            continue
        if any(target.endswith("experts.gate_up_proj") for target in targets) and len(names) == 2:
            gate, up = names[0].group(1), names[1].group(1)
        elif any(target.endswith("experts.down_proj") for target in targets) and len(names) == 1:
            down = names[0].group(1)
    return (gate, up, down) if gate and up and down else None


def _refuse_other_layouts(module: nn.Module, path: str) -> None:
    """Refuse an experts module whose layout (biases, transposed or interleaved weights) ExpertList does not compute."""
    differing = {name: getattr(module, name) for name, value in EAGER_LAYOUT.items()
                 if getattr(module, name, value) != value}
    if differing:
        raise ValueError(
            f"{path} ({type(module).__name__}) stores its experts as {differing}; only experts without biases, "
            "with concatenated gate/up weights of shape (experts, 2 x intermediate, hidden), are supported"
        )


def unstack_experts(model: nn.Module) -> int:
    """Replace every stacked experts module of ``model`` by an :class:`ExpertList`; return how many.

    The new linears are on the device and in the dtype of the stacked parameters (``meta`` for a
    skeleton: no memory). Stacked modules are left alone (the block refusal names them) when
    transformers has no per-expert checkpoint names for them.

    Raises:
        ValueError: an experts layout other than transformers' eager one (see ``EAGER_LAYOUT``).
    """
    stacked = [(path, module) for path, module in model.named_modules() if is_stacked_experts(module)]
    names = per_expert_names(model) if stacked else None
    if names is None:
        return 0
    for path, module in stacked:
        _refuse_other_layouts(module, path)
        gate_up, down = module.gate_up_proj, module.down_proj  # (E, 2I, H), (E, H, I)
        n_experts, hidden, intermediate = down.shape
        experts = ExpertList(
            ExpertMLP(names, hidden, intermediate, module.act_fn, gate_up.dtype, gate_up.device)
            for _ in range(n_experts)
        )
        if not gate_up.is_meta:  # a materialised model: the same weights, one linear per expert
            with torch.no_grad():
                for index, expert in enumerate(experts):
                    getattr(expert, names[0]).weight.copy_(gate_up[index, :intermediate])
                    getattr(expert, names[1]).weight.copy_(gate_up[index, intermediate:])
                    getattr(expert, names[2]).weight.copy_(down[index])
        parent_path, _, child = path.rpartition(".")
        model.get_submodule(parent_path).register_module(child, experts)
    return len(stacked)


def expert_linear_names(block: nn.Module) -> set[str]:
    """The names (relative to ``block``) of the linears that belong to one expert of an :class:`ExpertList`."""
    names = set()
    for path, module in block.named_modules():
        if isinstance(module, ExpertMLP):
            names.update(f"{path}.{name}" for name in (module.gate_name, module.up_name, module.down_name))
    return names
