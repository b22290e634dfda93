"""Statistics hooks: a cut-short forward feeds exactly what a full forward feeds, and skips the rest."""

from __future__ import annotations

import torch
from torch import nn

from pruners import get_pruner
from calib.hooks import feeding_statistics

WIDTH = 16


class TwoStageBlock(nn.Module):
    """``up`` → relu → ``down``, plus an ``unused`` linear that the forward never calls (an unrouted expert)."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.up = nn.Linear(WIDTH, 2 * WIDTH)
        self.down = nn.Linear(2 * WIDTH, WIDTH)
        self.unused = nn.Linear(WIDTH, WIDTH)
        for param in self.parameters():
            param.data = torch.randn(param.shape, generator=generator)
        self.down_calls = 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        inner = torch.relu(self.up(hidden))  # (b, T, 2W)
        output = self.down(inner)  # (b, T, W)
        self.down_calls += 1
        return hidden + output


def collect(block: TwoStageBlock, names: list[str], batches: list[torch.Tensor], cut: bool) -> dict[str, dict]:
    pruner = get_pruner("sparsegpt")  # Gram sums: sensitive to every token fed
    linears = {name: block.get_submodule(name) for name in names}
    stats = {name: pruner.new_stats(module.in_features, "cpu") for name, module in linears.items()}
    with torch.no_grad(), feeding_statistics(linears, stats) as cut_short:
        forward = cut_short(block) if cut else block
        for batch in batches:
            forward(batch)
    return {name: layer_stats.state() for name, layer_stats in stats.items()}


def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(2, 5, WIDTH, generator=generator) for _ in range(3)]  # (b, T, W) each


def test_cut_short_forward_feeds_the_same_statistics_and_skips_the_rest():
    full_block, cut_block = TwoStageBlock(), TwoStageBlock()
    full = collect(full_block, ["up", "down"], batches(), cut=False)
    cut = collect(cut_block, ["up", "down"], batches(), cut=True)
    assert full_block.down_calls == 3
    assert cut_block.down_calls == 0  # stopped in down's pre-hook: its matmul never ran
    for name in full:
        for key in full[name]:
            assert torch.equal(full[name][key], cut[name][key]), (name, key)


def test_cut_short_after_the_first_of_two_stages():
    block = TwoStageBlock()
    stats = collect(block, ["up"], batches(), cut=True)
    assert block.down_calls == 0
    assert stats["up"]  # fed


def test_a_linear_the_forward_never_calls_lets_every_forward_finish():
    block = TwoStageBlock()
    stats = collect(block, ["up", "down", "unused"], batches(), cut=True)
    assert block.down_calls == 3  # never complete: each forward ran to the end, and was not cut by stale state
    full = collect(TwoStageBlock(), ["up", "down"], batches(), cut=False)
    for key in full["down"]:
        assert torch.equal(stats["down"][key], full["down"][key])
