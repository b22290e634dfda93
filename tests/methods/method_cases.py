"""Shared pieces of the reconstruction-method tests."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to a busy machine's thread contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Stream:
    """The engine's activation-stream interface over an in-memory tensor."""

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor
        self.n_samples = tensor.shape[0]

    def read(self, indices: Tensor | slice) -> Tensor:
        return self.tensor[indices]
