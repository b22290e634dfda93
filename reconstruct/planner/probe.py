"""The model probe: one block of the model on ``meta`` with its arguments, and the model's sizes."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from calib.capture import capture_block_inputs
from reconstruct.modelio.architecture import build_skeleton, discover_layout, weight_as_out_in


@dataclass
class ModelProbe:
    """One block of the model on ``meta`` with its arguments, plus the model's sizes."""

    architecture: str
    block_class: str
    n_blocks: int
    hidden: int
    block: nn.Module  # on meta, in the compute dtype
    layout: object  # reconstruct.modelio.architecture.BlockLayout of the probe model
    arguments: object  # calib.capture.BlockArguments of the probe's one block, on meta
    block_numel: int  # floating parameters and buffers of one block
    block_other_bytes: int  # non-floating tensors of one block
    outside_numel: int  # tensors outside the blocks, LM head excluded (materialised for the capture)
    head_numel: int  # the LM head when it is not tied (read for the output)
    model_numel: int  # every parameter of the model


def _one_block_config(config):
    probe = copy.deepcopy(config)
    probe.num_hidden_layers = 1
    for name in ("layer_types", "mlp_only_layers"):  # per-layer lists some families validate against the depth
        value = getattr(probe, name, None)
        if isinstance(value, list) and len(value) > 1:
            setattr(probe, name, value[:1])
    return probe


def probe_model(config, dtype: torch.dtype, seq_len: int, layout=None) -> ModelProbe:
    """Build one block of ``config`` on meta and capture its keyword arguments at ``seq_len`` tokens.

    The modules before the blocks are materialised (uninitialised, on the CPU) so the model's own
    forward computes the block-0 keyword arguments (position ids and embeddings, masks) exactly as
    the engine's capture does; their memory is touched only where the zero tokens read it.
    ``layout`` (the engine's, when it has one) saves discovering it again.
    """
    n_blocks = int(config.num_hidden_layers)
    try:
        model = build_skeleton(_one_block_config(config), dtype)
    except Exception:  # a family whose config cannot shrink: the full skeleton is on meta anyway
        model = build_skeleton(config, dtype)
    if layout is None:
        layout = discover_layout(model, config)
    blocks = model.get_submodule(layout.blocks_path)
    block = blocks[0]
    head = model.get_output_embeddings()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    block_ids = {id(p) for p in block.parameters()}
    head_ids = {id(p) for p in head.parameters()} if head is not None and not tied else set()  # tied: the embedding
    outside_numel = sum(p.numel() for p in model.parameters() if id(p) not in block_ids and id(p) not in head_ids)
    head_numel = 0 if tied or head is None else sum(p.numel() for p in head.parameters())
    block_numel = sum(t.numel() for t in list(block.parameters()) + list(block.buffers()) if t.is_floating_point())
    block_other = sum(t.numel() * t.element_size() for t in block.buffers() if not t.is_floating_point())
    per_block = sum(p.numel() for p in block.parameters())
    model_numel = outside_numel + head_numel + n_blocks * per_block

    for module in model.modules():  # materialise what runs before block 0 (not the blocks, not the head)
        if module is head or any(module is b for b in blocks):
            continue
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta and id(param) not in block_ids and id(param) not in head_ids:
                module._parameters[name] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype), requires_grad=False)
    tokens = torch.zeros(2, seq_len, dtype=torch.long)  # sizes 1 and 2: expanded to any micro-batch, as the engine's
    arguments = capture_block_inputs(model, blocks, tokens, 2, lambda rows, x: None, torch.device("cpu"),
                                     check=False).to(torch.device("meta"))
    block.to("meta").requires_grad_(False)  # frozen, as block_io loads it: no weight gradients
    return ModelProbe(
        architecture=type(model).__name__, block_class=layout.block_class, n_blocks=n_blocks,
        hidden=int(config.hidden_size), block=block, layout=layout, arguments=arguments, block_numel=block_numel,
        block_other_bytes=block_other, outside_numel=outside_numel, head_numel=head_numel, model_numel=model_numel,
    )


def in_out(linear: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a linear or ``Conv1D``, whatever its storage layout."""
    out_features, in_features = weight_as_out_in(linear).shape
    return int(out_features), int(in_features)
