"""What reconstruction minimises and what the guard judges it by.

``mse``: the mean over every element of ``(out - target)²`` (PERP's objective).

``token-relative``: the mean over tokens of ``‖out_t - target_t‖² / ‖target_t‖²``, each token's
error relative to its own energy. Models that keep a few *massive activations* in the residual
stream (thousands of times the typical value, on the first token and on a few delimiter tokens)
make the MSE of every later block almost entirely that of those one or two tokens: on SmolLM2-135M
after 70% Wanda, 83–99% of the squared error of every block from 12 to 28 sits at the window's
first position, in three channels (docs/benchmarks.md, "Why the repair loses"). Training then spends itself on error the block
carries but barely affects, and a guard judging by that MSE stops on noise. Relative to each token,
the sink token weighs as much as any other.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOSSES = ("mse", "token-relative")


def error_terms(out: Tensor, target: Tensor, loss: str) -> Tensor:
    """The terms whose mean is the reconstruction error of ``out`` against ``target``.

    Args:
        out: (..., H) the pruned block's (or units') output, float32.
        target: (..., H) what it should match, float32.
        loss: one of LOSSES.

    Returns:
        ``mse``: (..., H) the squared differences; ``token-relative``: (...,) each token's squared
        error over its target's squared norm (a target of zero energy counts against the smallest
        positive float32, so its error stays finite only while the output is zero too).
    """
    squared = (out - target) ** 2  # (..., H)
    if loss == "mse":
        return squared
    if loss == "token-relative":
        energy = (target ** 2).sum(-1)  # (...,)
        return squared.sum(-1) / energy.clamp_min(torch.finfo(energy.dtype).tiny)
    raise ValueError(f"--recon-loss must be one of {', '.join(LOSSES)}; got {loss!r}")
