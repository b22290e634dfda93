"""The check at the door: the streamed forward against the model's own forward, before block 1.

The engine runs a model one block at a time with the arguments it recorded from the model's own
forward (``calib.capture``). Before a job touches anything, this module runs both on one short
window and compares: the model's own ``forward`` with every block's weights loaded just before
the model calls it and released right after (as accelerate's offloading does, one block in memory),
and, inside the same pass, the engine's streamed step on its own hidden states with its own
recorded arguments. Each block is read once. A family whose streamed forward differs is refused
with the size of the difference and the first block where it appears (``--no-check-stream`` skips
the check).
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from calib.capture import block_output, capture_block_inputs
from reconstruct.evaluation.streaming import load_head, replaying_blocks
from reconstruct.modelio.block_io import load_module_weights, release_module_weights
from reconstruct.modelio.loaded import LoadedModel

logger = logging.getLogger(__name__)

CHECK_WINDOWS = 2  # windows of the check: more than one, so batch expansion of the arguments is exercised
MIN_CHECK_TOKENS = 16
MAX_CHECK_TOKENS = 1024
# Both paths run the same kernels on the same shapes and weights, so they agree to the last bit on a
# deterministic device; the bound leaves room for non-deterministic GPU kernels only. A wrong mask or
# rotary table moves logits by a sizeable share of their scale (Gemma-3 with block 0's arguments: 0.55).
RELATIVE_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
HALF_PRECISION_TOLERANCE = 2e-2  # bfloat16 / float16


@dataclass(frozen=True)
class ParityResult:
    """How far the streamed forward is from the model's own, relative to the scale of the model's values."""

    tokens: int  # tokens per window
    logits_difference: float  # max |streamed - own| / max |own| over the logits
    block_differences: tuple[float, ...]  # the same for each block's output
    tolerance: float

    @property
    def ok(self) -> bool:
        """True when the logits agree within the tolerance."""
        return self.logits_difference <= self.tolerance

    def first_block_over(self) -> int | None:
        """The first block whose output differs by more than the tolerance (None: none)."""
        return next((index for index, diff in enumerate(self.block_differences) if diff > self.tolerance), None)


def check_tokens(config, seq_len: int) -> int:
    """Tokens per check window: past the longest sliding window (so windowed masks matter), within ``seq_len``."""
    windows = [getattr(config, name, None) for name in ("sliding_window", "attention_chunk_size")]
    longest = max([w for w in windows if isinstance(w, int) and w > 0], default=0)
    return max(2, min(seq_len, MAX_CHECK_TOKENS, max(MIN_CHECK_TOKENS, longest + 1)))


def tolerance_for(dtype: torch.dtype) -> float:
    """The relative tolerance of the check in ``dtype``."""
    return RELATIVE_TOLERANCE.get(dtype, HALF_PRECISION_TOLERANCE)


def _relative(ours: torch.Tensor, own: torch.Tensor) -> float:
    scale = float(own.abs().max().double()) or 1.0
    return float((ours.double() - own.double()).abs().max()) / scale


@torch.no_grad()
def compare_streamed_forward(loaded: LoadedModel, seq_len: int, seed: int = 0) -> ParityResult:
    """Run the model's own forward and the streamed one on ``CHECK_WINDOWS`` seeded random windows.

    Args:
        loaded: the model (skeleton on meta; blocks are loaded one at a time and released).
        seq_len: the job's window length (the check uses :func:`check_tokens` of it).
        seed: seeds the token ids.

    Returns:
        The relative differences of the logits and of every block's output.
    """
    n_tokens = check_tokens(loaded.config, seq_len)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, int(loaded.config.vocab_size), (CHECK_WINDOWS, n_tokens), generator=generator)
    batch = tokens.to(loaded.device)  # (2, T)
    blocks = loaded.blocks
    modules = loaded.load_outside_blocks()
    try:
        modules.append(load_head(loaded))
        first: dict[str, torch.Tensor] = {}
        # Recorded at batch size 1 and expanded to 2, as the engine's arguments are for sizes it did not record.
        arguments = capture_block_inputs(loaded.model, blocks, tokens, 1,
                                         lambda rows, hidden: first.setdefault("rows", []).append(hidden),
                                         loaded.device)
        lockstep = _Lockstep(loaded, arguments, torch.cat(first["rows"]))  # (2, T, H) into block 0
        own = lockstep.run_model(batch)
        streamed = {"hidden": lockstep.hidden}
        with replaying_blocks(blocks, streamed, arguments.tuple_output):
            ours = loaded.model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False).logits
    finally:
        for module in modules:
            release_module_weights(module)
        loaded.reader.close()
    return ParityResult(n_tokens, _relative(ours, own), tuple(lockstep.differences), tolerance_for(loaded.dtype))


class _Lockstep:
    """The model's own forward with each block loaded just before the model calls it and released after,
    and, inside the same call, the streamed step of that block on its own state.

    Each block is read once; ``differences`` gets one relative difference per block (streamed vs own).
    """

    def __init__(self, loaded: LoadedModel, arguments, hidden: torch.Tensor):
        self.loaded, self.arguments = loaded, arguments
        self.hidden = hidden  # (batch, T, H): the streamed state, entering the next block
        self.differences: list[float] = []
        self.inside_streamed = False

    def run_model(self, batch: torch.Tensor) -> torch.Tensor:
        """The model's own logits on ``batch`` (batch, T), every block compared on the way."""
        blocks = self.loaded.blocks
        with ExitStack() as hooks:
            for index, block in enumerate(blocks):
                hooks.callback(block.register_forward_pre_hook(self._loader(index), with_kwargs=True).remove)
                hooks.callback(block.register_forward_hook(self._comparer(index), with_kwargs=True).remove)
            try:
                return self.loaded.model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False).logits
            finally:
                for block in blocks:  # released even if the forward stopped halfway
                    release_module_weights(block)

    def _loader(self, index: int):
        loaded = self.loaded

        def hook(block, args, kwargs):
            if not self.inside_streamed:
                load_module_weights(block, loaded.layout.block_prefix(index), loaded.reader, loaded.key_map,
                                    loaded.device, loaded.dtype)
                loaded.reader.close()  # unmap the shards: pages of earlier blocks must not stay resident
        return hook

    def _comparer(self, index: int):
        def hook(block, args, kwargs, output):
            if self.inside_streamed:
                return
            self.inside_streamed = True
            try:
                self.hidden = self.arguments.run(block, index, self.hidden)
            finally:
                self.inside_streamed = False
            self.differences.append(_relative(self.hidden, block_output(output)))
            release_module_weights(block)
        return hook


def check_streamed_forward(loaded: LoadedModel, seq_len: int) -> ParityResult:
    """:func:`compare_streamed_forward`, refusing the model when the two forwards differ.

    Raises:
        ValueError: the size of the difference and the first block where it appears.
    """
    result = compare_streamed_forward(loaded, seq_len)
    logger.info("stream check: the streamed forward matches the model's own within %.1e (relative; %d tokens, "
                "tolerance %.0e)", result.logits_difference, result.tokens, result.tolerance)
    if not result.ok:
        block = result.first_block_over()
        where = "" if block is None else f"; the first block that differs is block {block + 1} of {len(result.block_differences)} " \
                                         f"(relative {result.block_differences[block]:.2e})"
        raise ValueError(
            f"--model {loaded.folder}: the streamed forward differs from the model's own forward by "
            f"{result.logits_difference:.2e} of the logits' scale (tolerance {result.tolerance:.0e}){where}; "
            f"{type(loaded.model).__name__} cannot be streamed exactly. Add --no-check-stream only if you know why"
        )
    return result
