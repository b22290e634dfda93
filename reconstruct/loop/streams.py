"""One block run over every micro-batch of an activation stream, optionally measured against targets."""

from __future__ import annotations

import torch

from calib.activations import ActivationStream
from reconstruct.methods import sum_of_squares
from reconstruct.parallel import distributed


@torch.no_grad()
def run_stream(
    forward, source: ActivationStream, micro_batch: int, destination: ActivationStream | None = None,
    compare_with: ActivationStream | None = None,
) -> tuple[float, float] | None:
    """Run ``forward`` over every micro-batch of ``source``.

    Outputs go to ``destination`` (may be ``source`` itself: samples are independent). If
    ``compare_with`` is given, returns the mean squared error of the outputs against it and the mean
    square of ``compare_with`` itself, the scale of that error (over every rank's samples in a
    distributed run: then every rank must call it); both summed as ``methods.sum_of_squares`` does,
    the arithmetic of ``methods.evaluate_mse``.
    """
    squared_error, target_square, count = 0.0, 0.0, 0
    for start in range(0, source.n_samples, micro_batch):
        rows = slice(start, min(start + micro_batch, source.n_samples))
        output = forward(source.read(rows))  # (b, T, H)
        if compare_with is not None:
            target = compare_with.read(rows).float()  # (b, T, H)
            squared_error += sum_of_squares(output.float() - target)
            target_square += sum_of_squares(target)
            count += target.numel()
        if destination is not None:
            destination.write(rows, output)
    if compare_with is None:
        return None
    squared_error, target_square, count = distributed.all_reduce_sum(squared_error, target_square, count)
    return squared_error / count, target_square / count
