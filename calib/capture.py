"""Capture what the model passes to its blocks: block 0's hidden states and *each* block's arguments.

The model's own forward runs with every block replaced by a pass-through recorder: block ``k``
records the positional and keyword arguments the model hands it (attention mask, position ids,
rotary ``position_embeddings``, ...) and returns its input unchanged, so the forward reaches the next
block. Families with ``config.layer_types`` (Gemma-2/3, Qwen with sliding layers, Cohere2, GPT-OSS)
give each layer type its own mask and rotary table; block ``k`` always runs with block ``k``'s own.

The arguments depend on positions and shapes, not on the token values or hidden states; that is
checked, not assumed: a second recorded pass with other tokens and other hidden states must see the
same arguments, and each block must receive exactly what the block before it returned. A model that
fails either check cannot be streamed, and is refused with the reason (:class:`NotStreamable`).
One recorded pass per micro-batch size suffices; the other micro-batches only run up to block 0.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

# Keyword arguments that belong to generation (caches, extra outputs), not to a single block forward.
DROPPED_KWARGS = ("past_key_value", "past_key_values", "use_cache", "output_attentions", "layer_past", "cache")


class NotStreamable(ValueError):
    """The model's forward does more between blocks than pass the hidden state on: it cannot be streamed."""


class _StopForward(Exception):
    """Raised by a recorder to end the model's forward (after block 0 or after the last block)."""


class _WrongOutputStructure(Exception):
    """The recorder returned a tensor where the model indexes a tuple (or the other way round)."""


@dataclass
class BlockCall:
    """What the model passes one block besides its hidden states."""

    args: tuple  # positional arguments after the hidden states (GPT-2 passes its mask positionally)
    kwargs: dict  # keyword arguments, generation-only ones dropped


def block_output(output) -> torch.Tensor:
    """The hidden states a block returns: the tensor itself or the first element of its tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


# --------------------------------------------------------------------------- recording one forward
class _Recorder:
    """Replaces every block's forward for one model forward; see the module docstring."""

    def __init__(self, n_blocks: int, tuple_output: bool, stop_after_first: bool, perturb: bool):
        self.calls: list[BlockCall | None] = [None] * n_blocks
        self.first_hidden: torch.Tensor | None = None
        self.tuple_output = tuple_output
        self.stop_after_first = stop_after_first
        self.perturb = perturb  # return other hidden states than received: the arguments must not change
        self.returned: torch.Tensor | None = None

    def forward_of(self, index: int) -> Callable:
        def forward(*args, **kwargs):
            if args:
                hidden, rest = args[0], tuple(args[1:])
            else:
                hidden, rest = kwargs.pop("hidden_states"), ()
            self._check_input(index, hidden)
            if index == 0:
                self.first_hidden = hidden.detach()
                if self.stop_after_first:
                    raise _StopForward
            self.calls[index] = BlockCall(rest, {k: v for k, v in kwargs.items() if k not in DROPPED_KWARGS})
            if index == len(self.calls) - 1:
                raise _StopForward
            output = hidden * 2 + 1 if self.perturb else hidden
            self.returned = output
            return (output,) if self.tuple_output else output

        return forward

    def _check_input(self, index: int, hidden) -> None:
        if index > 0 and self.calls[index - 1] is None:
            raise NotStreamable(f"block {index} runs before block {index - 1}: the model does not call its blocks in order")
        if index > 0 and self.calls[index] is not None:
            raise NotStreamable(f"block {index} is called twice in one forward")
        if index == 0 or hidden is self.returned:
            return
        expected = self.returned
        if isinstance(hidden, (tuple, list)) or (
            isinstance(hidden, torch.Tensor) and hidden.dim() == expected.dim() - 1
            and hidden.shape == expected.shape[1:] and torch.equal(hidden, expected[0])
        ):
            raise _WrongOutputStructure
        if not (isinstance(hidden, torch.Tensor) and hidden.shape == expected.shape and torch.equal(hidden, expected)):
            raise NotStreamable(
                f"between block {index - 1} and block {index} the model's forward changes the hidden states; "
                "the streamed forward can only pass one block's output on to the next"
            )


@contextmanager
def _recording(blocks: nn.ModuleList, recorder: _Recorder):
    for index, block in enumerate(blocks):
        block.forward = recorder.forward_of(index)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def _model_forward(model: nn.Module, batch: torch.Tensor) -> None:
    try:
        model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
    except _StopForward:
        return
    raise RuntimeError("the model's forward never reached its blocks: it does not go through its block list")


def _record(model: nn.Module, blocks: nn.ModuleList, batch: torch.Tensor, tuple_output: bool, *,
            stop_after_first: bool = False, perturb: bool = False) -> _Recorder:
    recorder = _Recorder(len(blocks), tuple_output, stop_after_first, perturb)
    with _recording(blocks, recorder):
        _model_forward(model, batch)
    if not stop_after_first:
        missing = [index for index, call in enumerate(recorder.calls[:-1]) if call is None]
        if missing or (len(blocks) > 0 and recorder.calls[-1] is None):
            raise NotStreamable(f"the model's forward skips block {missing[0] if missing else len(blocks) - 1}")
    return recorder


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b if isinstance(a, (int, float, str, bool, type(None))) else type(a) is type(b)


def _check_value_independent(reference: list[BlockCall], other: list[BlockCall]) -> None:
    """Refuse arguments that changed when the tokens and hidden states did."""
    for index, (a, b) in enumerate(zip(reference, other)):
        for position, (x, y) in enumerate(zip(a.args, b.args)):
            if not _same(x, y):
                raise NotStreamable(f"block {index}'s positional argument {position + 1} depends on the tokens or "
                                    "hidden states; the streamed forward captures arguments once per batch shape")
        for key in a.kwargs:
            if key not in b.kwargs or not _same(a.kwargs[key], b.kwargs[key]):
                raise NotStreamable(f"block {index}'s argument {key!r} depends on the tokens or hidden states; "
                                    "the streamed forward captures arguments once per batch shape")


def _share_identical(calls: list[BlockCall]) -> list[BlockCall]:
    """One ``BlockCall`` object for blocks whose arguments are the very same objects (one copy in memory)."""
    shared: dict[tuple, BlockCall] = {}
    result = []
    for call in calls:
        key = (tuple(id(a) for a in call.args), tuple((k, id(v)) for k, v in call.kwargs.items()))
        result.append(shared.setdefault(key, call))
    return result


@torch.no_grad()
def record_block_calls(model: nn.Module, blocks: nn.ModuleList, batch: torch.Tensor, *,
                       check: bool = False) -> tuple[torch.Tensor, list[BlockCall], bool]:
    """Run the model's forward once on ``batch`` (b, T) with pass-through blocks.

    Args:
        model: the causal LM; modules outside the blocks must be materialised on ``batch``'s device.
        blocks: its block list (the blocks may stay on ``meta``: they never run).
        batch: (b, T) token ids.
        check: also run a second forward with other tokens and other hidden states and refuse
            arguments that change with them (:class:`NotStreamable`).

    Returns:
        ``(block-0 hidden states (b, T, H), one BlockCall per block, tuple_output)``;
        ``tuple_output``: the model reads a block's output as a tuple (``outputs[0]``).
    """
    tuple_output = False
    try:
        recorder = _record(model, blocks, batch, tuple_output)
    except _WrongOutputStructure:
        tuple_output = True
        recorder = _record(model, blocks, batch, tuple_output)
    if check and len(blocks) > 1:
        vocab = int(getattr(model.config, "vocab_size", 0) or int(batch.max()) + 2)
        other = _record(model, blocks, (batch + 1) % vocab, tuple_output, perturb=True)
        _check_value_independent(recorder.calls, other.calls)
    return recorder.first_hidden, _share_identical(recorder.calls), tuple_output


# --------------------------------------------------------------------------- per micro-batch size
def _batch_dim_like(small, large, small_size: int, large_size: int) -> bool:
    return (
        isinstance(small, torch.Tensor)
        and isinstance(large, torch.Tensor)
        and small.dim() > 0
        and small.shape[0] == small_size
        and large.shape[0] == large_size
    )


def _resize(single, reference, reference_size: int, batch_size: int):
    """Expand the batch-1 value to ``batch_size`` wherever the reference shows a batch dimension."""
    if isinstance(single, (tuple, list)):
        return type(single)(_resize(s, r, reference_size, batch_size) for s, r in zip(single, reference))
    if isinstance(single, dict):
        return {key: _resize(single[key], reference[key], reference_size, batch_size) for key in single}
    if _batch_dim_like(single, reference, 1, reference_size):
        return single.expand(batch_size, *single.shape[1:])
    return single


def _move(value, device: torch.device, memo: dict):
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            memo[id(value)] = value.to(device)
        return memo[id(value)]
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device, memo) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device, memo) for k, v in value.items()}
    return value


class BlockArguments:
    """Each block's arguments, for any micro-batch size.

    Built from the calls recorded at batch size 1 and at the working micro-batch sizes: a tensor
    with leading size 1 in the first and the micro-batch size in another carries the batch
    dimension, and is expanded for sizes that were not recorded.
    """

    def __init__(self, by_size: dict[int, list[BlockCall]], tuple_output: bool = False):
        if 1 not in by_size:
            raise ValueError("BlockArguments needs the calls recorded at batch size 1")
        self.by_size = {size: list(calls) for size, calls in by_size.items()}
        self.n_blocks = len(by_size[1])
        larger = [size for size in by_size if size != 1]
        self.reference_size = max(larger) if larger else 1
        self.tuple_output = tuple_output  # the model reads block outputs as tuples

    def call(self, index: int, batch_size: int) -> BlockCall:
        """What block ``index`` gets with a (batch_size, T, H) input."""
        if batch_size not in self.by_size:
            memo: dict[int, BlockCall] = {}
            calls = []
            for single, reference in zip(self.by_size[1], self.by_size[self.reference_size]):
                if id(single) not in memo:
                    memo[id(single)] = BlockCall(
                        _resize(single.args, reference.args, self.reference_size, batch_size),
                        _resize(single.kwargs, reference.kwargs, self.reference_size, batch_size),
                    )
                calls.append(memo[id(single)])
            self.by_size[batch_size] = calls
        return self.by_size[batch_size][index]

    def run(self, block: nn.Module, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """``block(hidden)`` (b, T, H) → (b, T, H) with block ``index``'s arguments."""
        call = self.call(index, hidden.shape[0])
        output = block(hidden, *call.args, **call.kwargs)
        if isinstance(output, (tuple, list)):
            self.tuple_output = True  # seen on a real block (a one-block model's recording cannot tell)
        return block_output(output)

    def to(self, device: torch.device) -> "BlockArguments":
        """A copy with every tensor moved to ``device`` (a tensor shared by blocks stays shared)."""
        memo: dict[int, torch.Tensor] = {}
        calls_memo: dict[int, BlockCall] = {}

        def move_call(call: BlockCall) -> BlockCall:
            if id(call) not in calls_memo:
                calls_memo[id(call)] = BlockCall(_move(call.args, device, memo), _move(call.kwargs, device, memo))
            return calls_memo[id(call)]

        return BlockArguments({size: [move_call(c) for c in calls] for size, calls in self.by_size.items()},
                              self.tuple_output)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    tokens: torch.Tensor,
    micro_batch: int,
    store: Callable[[slice, torch.Tensor], None],
    device: torch.device,
    check: bool = True,
) -> BlockArguments:
    """Store block 0's inputs for every micro-batch of ``tokens``; return every block's arguments.

    Args:
        model: the causal LM; modules outside the blocks must be materialised on ``device``.
        blocks: the block list (blocks may be on the meta device: they never run).
        tokens: (n, T) token ids.
        micro_batch: samples per forward.
        store: ``store(sample_slice, hidden)`` receives (b, T, H) block-0 hidden states.
        device: where the forward runs.
        check: refuse a model whose block arguments depend on the token values or hidden states
            (one more recorded forward, of the first micro-batch).

    Returns:
        The arguments of every block at every micro-batch size seen (and at size 1).

    Raises:
        NotStreamable: the model's forward cannot be reproduced one block at a time.
    """
    by_size: dict[int, list[BlockCall]] = {}
    tuple_output = False
    for start in range(0, tokens.shape[0], micro_batch):
        batch = tokens[start : start + micro_batch].to(device)  # (b, T)
        if batch.shape[0] in by_size:
            recorder = _record(model, blocks, batch, tuple_output, stop_after_first=True)
            hidden = recorder.first_hidden
        else:
            hidden, calls, tuple_output = record_block_calls(model, blocks, batch, check=check and not by_size)
            by_size[batch.shape[0]] = calls
        store(slice(start, start + batch.shape[0]), hidden)
    if 1 not in by_size:
        _, by_size[1], _ = record_block_calls(model, blocks, tokens[:1].to(device))
    return BlockArguments(by_size, tuple_output)
