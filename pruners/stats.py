"""Streaming per-linear calibration statistics: sums that several processes can simply add up.

Statistics hold SUMS over tokens (never running means), in float32 whatever the activation dtype,
plus an exact int64 token count. ``state()`` returns the live tensors, so a distributed engine can
``all_reduce(SUM)`` them in place and the statistics then describe all ranks' tokens together.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

# Precision every statistic accumulates in, whatever the model dtype.
STATS_DTYPE = torch.float32
# Tokens converted to float32 at once in add_batch: bounds the temporary copy of the activations.
TOKEN_CHUNK = 4096


class LayerStats(ABC):
    """Calibration statistics of one linear layer's input activations.

    Args:
        in_features: the layer's input size.
        device: where the sums live (usually the layer's device).
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.in_features = int(in_features)
        self.device = torch.device(device)
        self.n_tokens = torch.zeros((), dtype=torch.int64, device=self.device)  # ()

    def add_batch(self, x: Tensor) -> None:
        """Accumulate a batch of the layer's inputs.

        Args:
            x: ``(..., in)`` activations, any float dtype and any leading dims (all are tokens).
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"activations have {x.shape[-1]} features but the statistics expect {self.in_features}"
            )
        tokens = x.detach().reshape(-1, self.in_features)  # (T, in)
        for t0 in range(0, tokens.shape[0], TOKEN_CHUNK):
            chunk = tokens[t0 : t0 + TOKEN_CHUNK].to(device=self.device, dtype=STATS_DTYPE)  # (t, in)
            self._accumulate(chunk)
        self.n_tokens += tokens.shape[0]

    @abstractmethod
    def _accumulate(self, x: Tensor) -> None:
        """Add ``x`` (``(t, in)`` float32 on ``self.device``) into the sums."""

    @abstractmethod
    def state(self) -> dict[str, Tensor]:
        """The live sum tensors by name; modifying them in place (all_reduce) updates the statistics."""

    def check_for(self, in_features: int, layer_hint: str = "layer") -> None:
        """Raise ``ValueError`` unless these statistics fit a layer with ``in_features`` inputs and saw tokens."""
        if self.in_features != in_features:
            raise ValueError(
                f"{layer_hint}: statistics cover {self.in_features} input features, the weight has {in_features}"
            )
        if int(self.n_tokens) <= 0:
            raise ValueError(
                f"{layer_hint}: no calibration tokens reached this layer; check the calibration data "
                "and that the forward hooks were registered"
            )


class SumSquaresStats(LayerStats):
    """Per-input-feature sum of squares ``sum_t x_tj^2`` (Wanda's squared column norms).

    State: ``{"sum_sq": (in,) float32, "n_tokens": () int64}``.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        super().__init__(in_features, device)
        self.sum_sq = torch.zeros(self.in_features, dtype=STATS_DTYPE, device=self.device)  # (in,)

    def _accumulate(self, x: Tensor) -> None:
        self.sum_sq += x.square().sum(dim=0)  # (in,)

    def state(self) -> dict[str, Tensor]:
        return {"sum_sq": self.sum_sq, "n_tokens": self.n_tokens}


class GramStats(LayerStats):
    """Sum of input outer products ``X^T X`` (SparseGPT's Hessian is ``2 X^T X / n_tokens``).

    State: ``{"xtx": (in, in) float32, "n_tokens": () int64}``. Memory: ``4 * in^2`` bytes.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        super().__init__(in_features, device)
        self.xtx = torch.zeros(self.in_features, self.in_features, dtype=STATS_DTYPE, device=self.device)  # (in, in)

    def _accumulate(self, x: Tensor) -> None:
        self.xtx.addmm_(x.T, x)  # (in, in)

    def state(self) -> dict[str, Tensor]:
        return {"xtx": self.xtx, "n_tokens": self.n_tokens}
