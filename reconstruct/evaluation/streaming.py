"""Logits of token windows from a model held whole in memory, or streamed one block at a time.

Evaluation (perplexity, zero-shot tasks) only needs next-token logits for batches of token ids.
``InMemoryLM`` runs the model the usual way; ``StreamedLM`` never holds more than one block: it
reuses the engine's pieces (``load_model``, ``capture_block_inputs`` / ``BlockArguments``,
``LoadedModel.visiting_block``), runs *every* window through block 0, then
block 1, ..., and finally the model's own forward once more with each block replaced by a replay
of the last hidden states, so the final norm, any output projection and the LM head are applied
exactly as the model defines them. ``open_lm`` picks one (``stream=None``: stream when the model's
bytes exceed the memory available on the device).

Both yield ``(set_index, rows, logits)`` with logits (b, T, V) for every micro-batch of every
token set; token sets are (n, T) tensors and may differ in T.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch
from torch import nn

from calib.activations import ActivationStream
from calib.capture import BlockArguments
from reconstruct.modelio.block_io import load_module_weights, release_module_weights
from reconstruct.modelio.checkpoint import CheckpointReader
from reconstruct.modelio.experts import is_stacked_experts
from reconstruct.modelio.safetensors_header import header_numel, read_safetensors_header
from reconstruct.modelio.loaded import LoadedModel, load_model
from reconstruct.progress import progress_bar
from reconstruct.runtime import dtype_name

logger = logging.getLogger(__name__)

AUTO_MEMORY_SHARE = 0.8  # stream when the weights need more than this share of the available memory
ACTIVATION_DEVICE_SHARE = 0.3  # keep the eval activations on the GPU when they fit in this share of free memory

LogitsBatches = Iterator[tuple[int, slice, torch.Tensor]]


# --------------------------------------------------------------------------- choosing
def model_bytes(folder: Path, dtype: torch.dtype) -> int:
    """Bytes the model's weights take in ``dtype``, from the checkpoint headers (nothing is loaded)."""
    itemsize = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else torch.iinfo(dtype).bits // 8
    total = 0
    for name in CheckpointReader(folder).files():
        path = Path(folder) / name
        if name.endswith(".safetensors"):
            total += sum(header_numel(entry) for entry in read_safetensors_header(path).values()) * itemsize
        else:  # .bin: no cheap header; assume 16-bit storage
            total += path.stat().st_size * itemsize // 2
    return total


def available_bytes(device: torch.device) -> int:
    """Memory the weights could use: free GPU memory, or available host memory on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)


def should_stream(folder: Path, device: torch.device, dtype: torch.dtype) -> bool:
    """True when the model's weights do not fit comfortably in the memory available on ``device``."""
    needed, available = model_bytes(folder, dtype), available_bytes(device)
    stream = needed > AUTO_MEMORY_SHARE * available
    logger.info(
        "model needs %.2f GiB, %.2f GiB available on %s: %s", needed / 2**30, available / 2**30, device,
        "streaming one block at a time" if stream else "loading it whole",
    )
    return stream


def open_lm(folder: Path, device: torch.device, dtype: torch.dtype, stream: bool | None = None):
    """An ``InMemoryLM`` or ``StreamedLM`` for ``folder`` (``stream=None``: decide from memory)."""
    if stream is None:
        stream = should_stream(folder, device, dtype)
    return StreamedLM(folder, device, dtype) if stream else InMemoryLM(folder, device, dtype)


# --------------------------------------------------------------------------- in memory
class InMemoryLM:
    """The whole model on ``device``, loaded with ``from_pretrained``.

    Stacked mixture-of-experts modules run transformers' eager experts forward (the form the engine
    computes, ``modelio.experts``; the default ``grouped_mm`` rounds otherwise and has no float64 kernel
    on the CPU).
    """

    streamed = False

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        if any(is_stacked_experts(module) for module in self.model.modules()):
            self.model.set_experts_implementation("eager")
        self.config = self.model.config

    @torch.no_grad()
    def logits(self, token_sets: list[torch.Tensor], micro_batch: int, desc: str = "eval") -> LogitsBatches:
        """``(set_index, rows, logits (b, T, V))`` for every micro-batch of every (n, T) token set (a bar named ``desc``)."""
        batches = [(i, start) for i, tokens in enumerate(token_sets) for start in range(0, tokens.shape[0], micro_batch)]
        for set_index, start in progress_bar(batches, desc=desc, unit="batch"):
            tokens = token_sets[set_index]
            rows = slice(start, min(start + micro_batch, tokens.shape[0]))
            batch = tokens[rows].to(self.device)  # (b, T)
            yield set_index, rows, self.model(input_ids=batch, use_cache=False).logits


# --------------------------------------------------------------------------- streamed
class StreamedLM:
    """The model streamed from its shards: one block in memory at a time."""

    streamed = True

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype):
        self._use(load_model(str(folder), str(device), dtype_name(dtype)))

    @classmethod
    def from_loaded(cls, loaded: LoadedModel) -> "StreamedLM":
        """A ``StreamedLM`` over a model already opened with ``load_model`` (its skeleton on ``meta``)."""
        lm = cls.__new__(cls)
        lm._use(loaded)
        return lm

    def _use(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.device = loaded.device
        self.config = loaded.config

    @torch.no_grad()
    def logits(self, token_sets: list[torch.Tensor], micro_batch: int, desc: str = "eval") -> LogitsBatches:
        """``(set_index, rows, logits (b, T, V))`` for every micro-batch of every (n, T) token set.

        The bar (``desc``, one step per block) runs while the blocks are computed.

        All batches are produced at the end, after the last block has run.
        """
        loaded = self.loaded
        streams, arguments = self._capture(token_sets, micro_batch)
        for index in progress_bar(range(loaded.layout.n_blocks), desc=f"{desc} blocks", unit="block"):
            with loaded.visiting_block(index) as block:
                for stream, set_arguments in zip(streams, arguments):
                    for rows in _micro_batches(stream.n_samples, micro_batch):
                        hidden = stream.read(rows)  # (b, T, H)
                        stream.write(rows, set_arguments.run(block, index, hidden))
        yield from self._head_pass(token_sets, streams, micro_batch, arguments[0].tuple_output)

    def _capture(self, token_sets: list[torch.Tensor],
                 micro_batch: int) -> tuple[list[ActivationStream], list[BlockArguments]]:
        """Block-0 inputs of every token set, and every block's arguments for each set."""
        loaded = self.loaded
        hidden = loaded.hidden_size
        n_values = sum(tokens.numel() for tokens in token_sets) * hidden
        tier = "cpu"
        if loaded.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(loaded.device)
            if n_values * torch.finfo(loaded.dtype).bits // 8 <= ACTIVATION_DEVICE_SHARE * free:
                tier = "device"
        streams, arguments = [], []
        for tokens in token_sets:
            n, seq_len = tokens.shape
            stream = ActivationStream(n, seq_len, hidden, dtype=loaded.dtype, device=loaded.device, tier=tier)
            arguments.append(loaded.capture_block_inputs(tokens, micro_batch, stream.write))
            streams.append(stream)
        return streams, arguments

    def _head_pass(self, token_sets, streams, micro_batch: int, tuple_output: bool) -> LogitsBatches:
        """Run the model's forward with every block replaying the final hidden states: final norm + head."""
        yield from head_logits(self.loaded, token_sets, streams, micro_batch, tuple_output)


def head_logits(loaded: LoadedModel, token_sets: list[torch.Tensor], streams: list[ActivationStream],
                micro_batch: int, tuple_output: bool) -> LogitsBatches:
    """``(set_index, rows, logits (b, T, V))`` of the final hidden states in ``streams`` (one per (n, T) token set).

    The model's own forward runs with every block replaying those hidden states, so the final norm,
    any output projection and the LM head are applied exactly as the model defines them; the
    modules outside the blocks and the head are loaded for it and released after.
    """
    modules = loaded.load_outside_blocks()
    modules.append(load_head(loaded))
    replay: dict[str, torch.Tensor] = {}
    try:
        with replaying_blocks(loaded.blocks, replay, tuple_output):
            for set_index, (tokens, stream) in enumerate(zip(token_sets, streams)):
                for rows in _micro_batches(stream.n_samples, micro_batch):
                    replay["hidden"] = stream.read(rows)  # (b, T, H)
                    batch = tokens[rows].to(loaded.device)  # (b, T)
                    output = loaded.model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
                    yield set_index, rows, output.logits
    finally:
        for module in modules:
            release_module_weights(module)


def _micro_batches(n: int, micro_batch: int) -> Iterator[slice]:
    for start in range(0, n, micro_batch):
        yield slice(start, min(start + micro_batch, n))


def load_head(loaded: LoadedModel) -> nn.Module:
    """Materialise the LM head; a tied head shares the (already loaded) input embedding's weight.

    Args:
        loaded: the model; its input embeddings must be loaded first when the head is tied.

    Returns:
        The head module, its weights on ``loaded.device``; release it with ``release_module_weights``.

    Raises:
        ValueError: the checkpoint lacks the head's weight (or bias) and the head is not tied.
    """
    model = loaded.model
    head = model.get_output_embeddings()
    prefix = next(name for name, module in model.named_modules() if module is head) + "."
    if prefix + "weight" in loaded.key_map:
        load_module_weights(head, prefix, loaded.reader, loaded.key_map, loaded.device, loaded.dtype)
        return head
    if not getattr(loaded.config, "tie_word_embeddings", True):
        raise ValueError(f"{loaded.folder}: the checkpoint has no {prefix}weight and config.json does not tie the head "
                         "to the input embeddings")
    embedding = model.get_input_embeddings()
    if embedding.weight.is_meta:
        raise ValueError(f"{loaded.folder}: the checkpoint has no {prefix}weight and the head is not tied to loaded embeddings")
    head._parameters["weight"] = embedding.weight
    if getattr(head, "bias", None) is not None:
        if prefix + "bias" not in loaded.key_map:
            raise ValueError(f"{loaded.folder}: the checkpoint has no {prefix}bias")
        bias = loaded.reader.read(loaded.key_map[prefix + "bias"]).to(loaded.device, loaded.dtype)
        head._parameters["bias"] = nn.Parameter(bias, requires_grad=False)
    return head


@contextmanager
def replaying_blocks(blocks: nn.ModuleList, replay: dict, tuple_output: bool):
    """Every block's forward returns ``replay["hidden"]`` (in the block's own output structure).

    The blocks stay on ``meta`` and in place, so the model's forward (masks, attribute look-ups on
    its layers) runs unchanged around them.

    Args:
        blocks: the model's blocks.
        replay: the caller sets ``replay["hidden"]`` (b, T, H) before each model forward.
        tuple_output: the blocks return a tuple (as captured from a real block forward).
    """

    def forward(*args, **kwargs):
        return (replay["hidden"],) if tuple_output else replay["hidden"]

    for block in blocks:
        block.forward = forward
    try:
        yield
    finally:
        for block in blocks:
            del block.forward
