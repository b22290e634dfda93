"""Device, dtype and memory measurements."""

from __future__ import annotations

import logging
import resource
import sys

import torch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}  # float64: exact comparisons in tests and research, never a default
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")  # what --dtype offers besides auto (not float64)


def resolve_device(name: str) -> torch.device:
    """``auto`` → the first CUDA device if there is one, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    """``auto`` → float32 on CPU, the checkpoint's dtype on a GPU (float32 when the config names none)."""
    if name == "auto":
        if device.type == "cpu" or checkpoint_dtype is None:
            return torch.float32
        return checkpoint_dtype
    if name not in DTYPES:
        raise ValueError(f"--dtype must be auto, {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def config_dtype(config) -> torch.dtype | None:
    """The dtype a model config records for its weights (``dtype``, or the older ``torch_dtype``), or None."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def model_dtype(name: str, device: torch.device, config) -> torch.dtype:
    """The compute dtype of ``--dtype name`` for the model of ``config`` on ``device``.

    The one place ``--dtype`` is decided for a model: run, eval, retrain, sweep and run's ``--eval``
    all come here, so ``auto`` means the same everywhere (float32 on CPU, the checkpoint's dtype on a GPU).

    Raises:
        ValueError: ``name`` is not auto or a known dtype.
    """
    return resolve_dtype(name, device, config_dtype(config))


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def peak_gpu_mb(device: torch.device) -> float | None:
    """Peak memory allocated by torch on ``device`` so far, in MiB (None on CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20
