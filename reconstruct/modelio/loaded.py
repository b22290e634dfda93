"""A model opened for streaming: skeleton on ``meta``, layout, checkpoint reader and key map."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from calib.capture import BlockArguments, capture_block_inputs
from calib.framing import SequenceFraming, resolve_framing
from reconstruct.modelio.architecture import BlockLayout, build_skeleton, discover_layout, load_config
from reconstruct.modelio.block_io import load_module_weights, release_module_weights
from reconstruct.modelio.checkpoint import CheckpointReader, match_checkpoint_keys
from reconstruct.modelio.conversions import model_conversions, refuse_tensor_conversions, renamed_keys
from reconstruct.modelio.source import resolve_model
from reconstruct.runtime import model_dtype, resolve_device

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """Everything the engine needs to stream a model; holds no weights until asked."""

    folder: Path  # local folder with config and shards
    config: PretrainedConfig
    model: nn.Module  # skeleton, parameters on meta
    layout: BlockLayout
    reader: CheckpointReader
    key_map: dict[str, str]  # model state-dict key → checkpoint key
    device: torch.device
    dtype: torch.dtype  # compute dtype
    framings: dict[str, SequenceFraming] = field(default_factory=dict, repr=False)  # --calib-bos mode → framing

    @property
    def blocks(self) -> nn.ModuleList:
        """The model's list of transformer blocks."""
        return self.model.get_submodule(self.layout.blocks_path)

    @property
    def hidden_size(self) -> int:
        """Width of the residual stream between blocks."""
        return int(self.config.hidden_size)

    def tokenizer(self):
        """The model's tokenizer (from its folder)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.folder)

    def framing(self, mode: str) -> SequenceFraming:
        """How token windows start under ``--calib-bos mode``, from the model's tokenizer (resolved once).

        Raises:
            ValueError: ``always`` for a tokenizer without a BOS token, or an unknown mode.
        """
        if mode not in self.framings:
            self.framings[mode] = resolve_framing(self.tokenizer(), mode)
        return self.framings[mode]

    def outside_modules(self, include_head: bool) -> list[tuple[str, nn.Module]]:
        """Modules that are not inside the block list, as ``(prefix, module)``.

        Walks from the root down the block list's path: every sibling met on the way is outside.
        The LM head (output embeddings) is included only when asked.
        """
        head = self.model.get_output_embeddings()
        parts = self.layout.blocks_path.split(".")
        found: list[tuple[str, nn.Module]] = []
        node, prefix = self.model, ""
        for part in parts:
            for name, child in node.named_children():
                if name != part and (include_head or child is not head):
                    found.append((f"{prefix}{name}.", child))
            node, prefix = getattr(node, part), f"{prefix}{part}."
        return found

    def load_outside_blocks(self) -> list[nn.Module]:
        """Materialise embeddings, norms and rotary modules (not the head) on the device."""
        modules = []
        for prefix, module in self.outside_modules(include_head=False):
            load_module_weights(module, prefix, self.reader, self.key_map, self.device, self.dtype)
            modules.append(module)
        return modules

    @contextmanager
    def visiting_block(self, index: int) -> Iterator[nn.Module]:
        """Block ``index`` with its weights on the device, released on exit (also when the body raises).

        The reader is closed once the weights are in: the shard pages of earlier blocks must not stay
        resident (it reopens on the next read). The one way to load, run and release a block outside
        the engine's read-ahead loop (``loop.overlap``).
        """
        block = self.blocks[index]
        load_module_weights(block, self.layout.block_prefix(index), self.reader, self.key_map, self.device, self.dtype)
        try:
            self.reader.close()
            yield block
        finally:
            release_module_weights(block)

    def capture_block_inputs(self, tokens: torch.Tensor, micro_batch: int,
                             sink: Callable[[slice, torch.Tensor], None], check: bool = True) -> BlockArguments:
        """Block-0 inputs of ``tokens`` (n, T) into ``sink`` and every block's own arguments.

        The modules outside the blocks (embeddings, rotary tables) are loaded for the capture and
        released after it. See ``calib.capture.capture_block_inputs``.
        """
        outside = self.load_outside_blocks()
        try:
            return capture_block_inputs(self.model, self.blocks, tokens, micro_batch, sink, self.device, check=check)
        finally:
            for module in outside:
                release_module_weights(module)

    def read_outside_block_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor outside the blocks, read unchanged from the checkpoint (bit-identical)."""
        block_prefix = self.layout.blocks_path + "."
        head = self.model.get_output_embeddings()
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        head_keys = {f"{name}.weight" for name, module in self.model.named_modules() if module is head}
        tensors: dict[str, torch.Tensor] = {}
        for key in self.model.state_dict():
            if key.startswith(block_prefix):
                continue
            if key in self.key_map:
                tensors[key] = self.reader.read(self.key_map[key]).contiguous()
            elif not (tied and key in head_keys):
                logger.warning("%s is not in the checkpoint; it is left out of the output", key)
        return tensors


def load_model(model: str, device_name: str, dtype_name: str) -> LoadedModel:
    """Resolve ``model``, build its skeleton on meta and check the checkpoint covers the blocks."""
    folder = resolve_model(model)
    config = load_config(folder)
    device = resolve_device(device_name)
    dtype = model_dtype(dtype_name, device, config)
    skeleton = build_skeleton(config, dtype)
    layout = discover_layout(skeleton, config)
    reader = CheckpointReader(folder)
    conversions = model_conversions(skeleton)
    refuse_tensor_conversions(reader.keys(), conversions, config.model_type, model, list(skeleton.state_dict()))
    key_map = match_checkpoint_keys(list(skeleton.state_dict()), reader.keys(), skeleton.base_model_prefix,
                                    renamed_keys(reader.keys(), conversions))
    missing = [k for k in skeleton.state_dict() if k.startswith(layout.blocks_path + ".") and k not in key_map]
    if missing:
        raise ValueError(
            f"--model {model}: the checkpoint lacks {len(missing)} block tensors (first: {missing[0]}); "
            "its key names do not match the architecture in config.json"
        )
    logger.info(
        "%s: %s with %d × %s, %d prunable linears per block, dtype %s on %s",
        folder, type(skeleton).__name__, layout.n_blocks, layout.block_class, len(layout.linear_names), dtype, device,
    )
    return LoadedModel(folder, config, skeleton, layout, reader, key_map, device, dtype)
