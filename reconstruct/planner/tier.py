"""The activation-cache tier of ``--offload auto``: one rule, used by the memory plan and by the job state.

``--offload auto`` takes the fastest tier whose job fits: device (GPU runs only), then cpu, then
disk, which always runs. What "fits" means depends on what is known: the memory plan checks every
phase of the job against the budgets (``plan.fits``); without a plan (a model the planner cannot
probe) the streams alone must fit in a share of the free memory, leaving the rest for the block
and its activations.
"""

from __future__ import annotations

from collections.abc import Callable

import psutil
import torch

AUTO_HOST_SHARE = 0.5  # without a plan: the activation cache may use this share of available host memory
AUTO_DEVICE_SHARE = 0.3  # ... and this share of free GPU memory


def auto_tiers(device_type: str) -> list[str]:
    """The tiers ``--offload auto`` tries, fastest first: device (GPU runs only), cpu, disk."""
    return ["device", "cpu", "disk"] if device_type == "cuda" else ["cpu", "disk"]


def choose_stream_tier(offload: str, device_type: str, fits: Callable[[str], bool]) -> str:
    """The activation-cache tier of a job.

    Args:
        offload: the ``--offload`` flag: device, cpu, disk, or auto.
        device_type: "cuda" or "cpu", the compute device.
        fits: whether the job fits with its streams on a tier; asked fastest tier first, only for auto.

    Returns:
        ``offload`` unless it is auto; else the fastest tier that fits, or disk when none does.
    """
    if offload != "auto":
        return offload
    tiers = auto_tiers(device_type)
    return next((tier for tier in tiers if fits(tier)), tiers[-1])


def streams_fit_free_memory(stream_bytes: int, device: torch.device) -> Callable[[str], bool]:
    """The ``fits`` of :func:`choose_stream_tier` without a plan: the streams in a share of free memory.

    Args:
        stream_bytes: bytes of all activation streams of this process together.
        device: the compute device (its free memory is measured for the device tier).
    """

    def fits(tier: str) -> bool:
        if tier == "device":
            free, _ = torch.cuda.mem_get_info(device)
            return stream_bytes <= AUTO_DEVICE_SHARE * free
        if tier == "cpu":
            return stream_bytes <= AUTO_HOST_SHARE * psutil.virtual_memory().available
        return True  # disk: memory-mapped files

    return fits
