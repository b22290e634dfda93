"""The activation cache: one stream of block inputs for every calibration sample.

A stream is an (n_samples, seq_len, hidden) tensor held on the compute device, in host memory
(pinned when the device is a GPU), or in a memory-mapped file on disk. Reads return micro-batches
on the compute device; writes accept them back. The sample axis is what gets split across
processes in distributed runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

TIERS = ("device", "cpu", "disk")


class ActivationStream:
    """Block inputs for all calibration samples, stored in one tier."""

    def __init__(
        self,
        n_samples: int,
        seq_len: int,
        hidden: int,
        dtype: torch.dtype,
        device: torch.device,
        tier: str,
        disk_path: Path | None = None,
    ):
        if tier not in TIERS:
            raise ValueError(f"--offload must be one of auto, {', '.join(TIERS)}, got {tier!r}")
        self.shape = (n_samples, seq_len, hidden)
        self.dtype = dtype
        self.device = device
        self.tier = tier
        if tier == "device":
            self.data = torch.zeros(self.shape, dtype=dtype, device=device)
        elif tier == "cpu":
            self.data = torch.zeros(self.shape, dtype=dtype, pin_memory=device.type == "cuda")
        else:
            if disk_path is None:
                raise ValueError("the disk tier needs a file path")
            disk_path.parent.mkdir(parents=True, exist_ok=True)
            n_bytes = int(np.prod(self.shape)) * torch.finfo(dtype).bits // 8
            with open(disk_path, "wb") as handle:
                handle.truncate(n_bytes)
            self.data = torch.from_file(str(disk_path), shared=True, size=int(np.prod(self.shape)), dtype=dtype)
            self.data = self.data.view(self.shape)

    @property
    def n_samples(self) -> int:
        """Number of calibration samples in the stream."""
        return self.shape[0]

    def read(self, indices: slice | torch.Tensor) -> torch.Tensor:
        """Samples ``indices`` on the compute device, shape (b, T, H)."""
        return self.data[indices].to(self.device, non_blocking=True)

    def write(self, indices: slice, values: torch.Tensor) -> None:
        """Store (b, T, H) ``values`` at samples ``indices``."""
        self.data[indices] = values.to(self.data.device, self.dtype)

    def copy_from(self, other: "ActivationStream") -> None:
        """Overwrite this stream with the contents of ``other`` (same shape)."""
        self.data.copy_(other.data.to(self.data.device))

    def to_cpu(self) -> torch.Tensor:
        """The whole stream as a CPU tensor (for checkpoints), shape (n, T, H)."""
        return self.data.detach().to("cpu")

    def load(self, values: torch.Tensor) -> None:
        """Replace the whole stream with ``values`` (n, T, H)."""
        if tuple(values.shape) != self.shape:
            raise ValueError(f"activation checkpoint has shape {tuple(values.shape)}, expected {self.shape}")
        self.data.copy_(values.to(self.data.device, self.dtype))

    def rows(self, start: int, stop: int) -> "ActivationStream":
        """Samples ``start .. stop - 1`` as a stream of their own that shares this one's storage.

        Reads and writes go to this stream's rows (any tier: a view of the tensor, or of the
        memory map). The engine hands the pruner and the error measurements the calibration rows
        alone this way when the streams also carry ``--recon-val-data``'s rows.
        """
        view = object.__new__(ActivationStream)
        view.data = self.data[start:stop]  # (stop - start, T, H), no copy
        view.shape = tuple(view.data.shape)
        view.dtype, view.device, view.tier = self.dtype, self.device, self.tier
        return view

    def nbytes(self) -> int:
        """Bytes the stream occupies in its tier."""
        return self.data.numel() * self.data.element_size()
