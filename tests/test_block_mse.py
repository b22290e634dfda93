"""One block MSE: the propagation pass and ``evaluate_mse`` compute it with the same arithmetic."""

from __future__ import annotations

import torch

from reconstruct.loop.streams import run_stream
from reconstruct.methods import evaluate_mse, sum_of_squares


class _Stream:
    def __init__(self, data: torch.Tensor) -> None:
        self.data, self.n_samples = data, data.shape[0]

    def read(self, indices):
        return self.data[indices]

    def write(self, rows, values):
        self.data[rows] = values


def test_sum_of_squares_accumulates_in_float64():
    values = torch.full((1 << 20,), 1.0 + 2.0**-12)  # float32 accumulation drifts over 2^20 terms
    square = float(values[0] ** 2)  # one float32 square (exact as a double)
    assert sum_of_squares(values) == (1 << 20) * square  # a float64 sum of equal terms, all exact


def test_mse_after_propagation_equals_evaluate_mse_to_the_bit():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(6, 64, 96, generator=generator)  # (n, T, H)
    targets = torch.randn(6, 64, 96, generator=generator) * 3
    weight = torch.randn(96, 96, generator=generator) / 10

    def forward(x):
        return x @ weight  # (b, T, H)

    evaluated = evaluate_mse(forward, _Stream(inputs), _Stream(targets), micro_batch=4)
    propagated, scale = run_stream(forward, _Stream(inputs.clone()), 4, compare_with=_Stream(targets))
    assert propagated == evaluated
    assert scale == sum_of_squares(targets) / targets.numel()
