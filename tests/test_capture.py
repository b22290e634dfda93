"""Capture of each block's arguments from the model's own forward, and the refusals of what cannot stream.

Toy "models" written here call a list of blocks the ways real families do (a different mask per
layer type, the block output read as a tuple, positional arguments) and the ways streaming cannot
reproduce (hidden states changed between blocks, arguments computed from the hidden states).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from calib.capture import BlockArguments, NotStreamable, capture_block_inputs


class Block(nn.Module):
    """``x * scale + shift``, the shift passed by the model (as a mask or rotary table would be)."""

    def __init__(self, tuple_output: bool = False):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.tuple_output = tuple_output

    def forward(self, hidden, mask=None, *, shift):
        out = hidden * self.scale + shift + (0 if mask is None else mask)
        return (out, None) if self.tuple_output else out


class ToyModel(nn.Module):
    """Embeds tokens, then calls its blocks; ``mode`` picks how."""

    def __init__(self, mode: str = "per-type", n_blocks: int = 3, tuple_output: bool = False):
        super().__init__()
        self.embed = nn.Embedding(16, 4)
        self.layers = nn.ModuleList(Block(tuple_output) for _ in range(n_blocks))
        self.config = type("Config", (), {"vocab_size": 16})()
        self.mode = mode

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        hidden = self.embed(input_ids)  # (b, T, 4)
        positions = torch.arange(input_ids.shape[1], dtype=hidden.dtype)[None, :, None]  # (1, T, 1)
        shifts = {"sliding": positions * 0.5, "full": positions * 2.0}
        for index, layer in enumerate(self.layers):
            layer_type = "full" if index % 2 else "sliding"
            if self.mode == "from-hidden":
                shift = hidden.mean().expand(1, 1, 1)  # depends on the values: cannot be captured once
            else:
                shift = shifts[layer_type]
            output = layer(hidden, None, shift=shift)
            hidden = output[0] if isinstance(output, tuple) else output
            if self.mode == "rescale-between":
                hidden = hidden * 0.5  # the forward does more between blocks than pass the state on
        return hidden


def reference_block_outputs(model: ToyModel, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Each block's output in the model's own forward."""
    outputs = []
    hooks = [layer.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o))
             for layer in model.layers]
    with torch.no_grad():
        model(tokens)
    for hook in hooks:
        hook.remove()
    return outputs


def stream(model: ToyModel, tokens: torch.Tensor, micro_batch: int) -> tuple[list[torch.Tensor], BlockArguments]:
    """Each block's output when the blocks run one after another with the captured arguments."""
    hidden = torch.empty(tokens.shape[0], tokens.shape[1], 4)
    arguments = capture_block_inputs(model, model.layers, tokens, micro_batch,
                                     lambda rows, x: hidden.__setitem__(rows, x), torch.device("cpu"))
    outputs = []
    with torch.no_grad():
        for index, layer in enumerate(model.layers):
            hidden = arguments.run(layer, index, hidden)
            outputs.append(hidden)
    return outputs, arguments


@pytest.mark.parametrize("tuple_output", [False, True])
def test_each_block_runs_with_its_own_arguments(tuple_output):
    torch.manual_seed(0)
    model = ToyModel(tuple_output=tuple_output)
    tokens = torch.randint(0, 16, (5, 6))
    streamed, arguments = stream(model, tokens, micro_batch=2)  # sizes 2 and 1 recorded; 5 expanded from 1
    assert arguments.tuple_output is tuple_output  # found from which way the model reads a block's output
    for ours, theirs in zip(streamed, reference_block_outputs(model, tokens)):
        assert torch.equal(ours, theirs)  # the same elementwise operations on the same values
    # blocks of one layer type share one set of arguments; the two types differ
    assert arguments.call(0, 2) is arguments.call(2, 2) and arguments.call(0, 2) is not arguments.call(1, 2)
    assert arguments.call(1, 5).args == (None,)  # the positional mask is passed on too


def test_block_zeros_arguments_everywhere_would_be_another_model():
    """What the capture fixes: block 0's arguments for every block give other outputs from block 1 on."""
    torch.manual_seed(0)
    model = ToyModel()
    tokens = torch.randint(0, 16, (2, 6))
    streamed, arguments = stream(model, tokens, micro_batch=2)
    hidden = reference_block_outputs(model, tokens)[0]
    wrong = arguments.run(model.layers[1], 0, hidden)
    assert not torch.equal(wrong, streamed[1])


def test_a_forward_that_changes_hidden_states_between_blocks_is_refused():
    with pytest.raises(NotStreamable, match="between block 0 and block 1 the model's forward changes the hidden"):
        stream(ToyModel("rescale-between"), torch.randint(0, 16, (2, 6)), micro_batch=2)


def test_arguments_computed_from_the_hidden_states_are_refused():
    with pytest.raises(NotStreamable, match="argument 'shift' depends on the tokens or hidden states"):
        stream(ToyModel("from-hidden"), torch.randint(0, 16, (2, 6)), micro_batch=2)


def test_arguments_move_to_a_device_keeping_what_blocks_share():
    model = ToyModel()
    _, arguments = stream(model, torch.randint(0, 16, (2, 6)), micro_batch=2)
    moved = arguments.to(torch.device("meta"))
    assert moved.call(0, 2).kwargs["shift"].is_meta
    assert moved.call(0, 2) is moved.call(2, 2)
