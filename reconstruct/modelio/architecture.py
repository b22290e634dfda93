"""Generic discovery of a causal LM's transformer blocks and their prunable linear layers.

One code path serves every architecture: the block class comes from ``model._no_split_modules``,
the block list is the ``nn.ModuleList`` holding those blocks, and the prunable layers are the
``nn.Linear`` / ``Conv1D`` modules inside a block. The embeddings and the LM head are never pruned.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from pruners.layers import weight_as_out_in  # noqa: F401  (re-exported: the engine imports it from here)
from reconstruct.modelio.experts import unstack_experts

logger = logging.getLogger(__name__)

# Config flags that switch biases on for a family's linears (LLaMA: attention_bias, mlp_bias; OPT:
# enable_bias). Which linears each flag controls is found by building one block with the flag on.
BIAS_CONFIG_FLAGS = ("attention_bias", "mlp_bias", "enable_bias", "bias", "use_bias", "add_bias_linear")

CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def is_prunable_linear(module: nn.Module) -> bool:
    """True for the layer types whose weights we prune: ``nn.Linear`` and GPT-2 style ``Conv1D``."""
    return isinstance(module, (nn.Linear, Conv1D))


@dataclass(frozen=True)
class BlockLayout:
    """Where the blocks live and what is prunable inside one."""

    blocks_path: str  # dotted path of the nn.ModuleList, e.g. "model.layers"
    block_class: str  # e.g. "LlamaDecoderLayer"
    n_blocks: int
    linear_names: tuple[str, ...]  # prunable layers, relative to a block, in registration order
    bias_flags: dict[str, tuple[str, ...]]  # config flag → linears it gives a bias

    def block_prefix(self, index: int) -> str:
        """State-dict prefix of block ``index``, e.g. ``model.layers.3.``."""
        return f"{self.blocks_path}.{index}."


def load_config(folder: Path) -> PretrainedConfig:
    """Read ``config.json`` and refuse models that are not decoder-only causal LMs."""
    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as error:
        raise ValueError(f"--model {folder}: transformers cannot read its config ({error})") from None
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"--model {folder}: {config.model_type} is an encoder-decoder model; only decoder-only causal LMs stream"
        )
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(name.endswith(CAUSAL_LM_SUFFIXES) for name in architectures):
        raise ValueError(
            f"--model {folder}: its architecture {', '.join(architectures)} is not a causal LM "
            "(expected a *ForCausalLM / *LMHeadModel checkpoint)"
        )
    return config


def build_skeleton(config: PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    """Instantiate the model with parameters on the ``meta`` device (no memory) and real buffers.

    Buffers stay real because non-persistent ones (rotary ``inv_freq``) are computed at init and
    are not in the checkpoint. Stacked mixture-of-experts parameters become one ``nn.Linear`` per
    expert and projection, named as the checkpoint names them (``modelio.experts``).
    """
    from accelerate import init_empty_weights

    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as error:
        raise ValueError(
            f"model type {config.model_type!r} has no causal-LM class in transformers: {str(error).splitlines()[0]}"
        ) from None
    unstack_experts(model)
    model.eval()
    return model


def find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Locate the ``nn.ModuleList`` whose children are the model's transformer blocks."""
    block_classes = set(getattr(model, "_no_split_modules", None) or [])
    if not block_classes:
        raise ValueError(
            f"{type(model).__name__} does not declare its block class (_no_split_modules); cannot stream it"
        )
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if all(type(child).__name__ in block_classes for child in module):
                if best is None or len(module) > len(best[1]):
                    best = (name, module)
    if best is None:
        raise ValueError(
            f"{type(model).__name__}: no list of {', '.join(sorted(block_classes))} blocks found; cannot stream it"
        )
    return best


def discover_layout(model: nn.Module, config: PretrainedConfig) -> BlockLayout:
    """Describe the model's blocks generically (see module docstring)."""
    blocks_path, blocks = find_block_list(model)
    first = blocks[0]
    refuse_unsupported_blocks(blocks)
    linear_names = tuple(name for name, module in first.named_modules() if is_prunable_linear(module))
    if not linear_names:
        raise ValueError(f"{type(first).__name__} has no nn.Linear/Conv1D layers to prune")
    return BlockLayout(
        blocks_path=blocks_path,
        block_class=type(first).__name__,
        n_blocks=len(blocks),
        linear_names=linear_names,
        bias_flags=probe_bias_flags(config, blocks_path, first),
    )


def refuse_unsupported_blocks(blocks: nn.ModuleList) -> None:
    """Refuse blocks the engine would stream or prune wrongly, naming what is unsupported.

    * Weights stored as 3-D (or higher) parameters outside any ``nn.Linear`` (stacked
      mixture-of-experts projections that ``modelio.experts`` cannot unstack, having no per-expert
      checkpoint names for them): the pruners and adapters work on 2-D linear weights, so the
      experts would stay dense.
    * Blocks that differ in their parameters (names or shapes): one layout serves every block.
    """
    first = blocks[0]
    for name, param in first.named_parameters():
        if param.dim() >= 3:
            raise ValueError(
                f"{type(first).__name__}.{name} is a {param.dim()}-D parameter {tuple(param.shape)} outside any "
                "nn.Linear (stacked mixture-of-experts weights): pruning and repairing such experts is not "
                "supported yet"
            )
    shapes = {name: tuple(param.shape) for name, param in first.named_parameters()}
    for index, block in enumerate(blocks):
        other = {name: tuple(param.shape) for name, param in block.named_parameters()}
        if other != shapes:
            differing = sorted(set(other.items()) ^ set(shapes.items()))[0][0]
            raise ValueError(
                f"block {index} ({type(block).__name__}) differs from block 0 in its parameters (first: {differing}); "
                "blocks of different structure in one model are not supported yet"
            )


def probe_bias_flags(config: PretrainedConfig, blocks_path: str, block: nn.Module) -> dict[str, tuple[str, ...]]:
    """For each bias flag the config has, which linears gain a bias when it is switched on."""
    without_bias = {name for name, m in block.named_modules() if is_prunable_linear(m) and m.bias is None}
    flags: dict[str, tuple[str, ...]] = {}
    for flag in BIAS_CONFIG_FLAGS:
        if not isinstance(getattr(config, flag, None), bool):
            continue
        probe_config = copy.deepcopy(config)
        setattr(probe_config, flag, True)
        probe_config.num_hidden_layers = 1
        try:
            probe_model = build_skeleton(probe_config, torch.float32)
        except Exception:  # a flag some families validate differently: it simply is not a bias switch
            continue
        _, probe_blocks = find_block_list(probe_model)
        gained = tuple(
            sorted(
                name
                for name, m in probe_blocks[0].named_modules()
                if name in without_bias and is_prunable_linear(m) and m.bias is not None
            )
        )
        if gained:
            flags[flag] = gained
    return flags

