"""Memory budgets: ``--gpu-memory`` / ``--host-memory`` sizes parsed, bytes printed."""

from __future__ import annotations

import re
from dataclasses import dataclass

from reconstruct.flags import flag, flag_name

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30

UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
         "tb": 10**12, "kib": KIB, "mib": MIB, "gib": GIB, "tib": 1 << 40}


def parse_bytes(text: str, flag: str = "--gpu-memory") -> int:
    """``"24GiB"``, ``"24GB"``, ``"512MiB"``, ``"1e9"`` → bytes. GB = 10^9, GiB = 2^30.

    Raises:
        ValueError: naming ``flag`` when the text is not a positive size.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"{flag} must be a size such as 24GiB, 80GB or 512MiB; got {text!r}")
    return int(float(match.group(1)) * UNITS[unit])


def human(n_bytes: float) -> str:
    """Bytes as a short binary size: ``1.50 GiB``, ``12.0 MiB``."""
    for unit, size in (("TiB", 1 << 40), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(n_bytes) >= size:
            return f"{n_bytes / size:.2f} {unit}" if unit in ("TiB", "GiB") else f"{n_bytes / size:.1f} {unit}"
    return f"{int(n_bytes)} B"


@dataclass(frozen=True)
class MemoryBudget:
    """What the job may use; None = measure this machine (free GPU memory, available host memory)."""

    # the flags give sizes as text: from_flags
    device_bytes: int | None = flag(None, "--gpu-memory", "GPU memory the job may use, e.g. 24GiB or 80GB.",
                                    cli_type=str, show_default="the GPU's free memory")
    host_bytes: int | None = flag(None, "--host-memory", "Host memory the job may use, e.g. 64GiB.", cli_type=str,
                                  show_default="available memory")

    @classmethod
    def from_flags(cls, device_bytes: str | None = None, host_bytes: str | None = None) -> MemoryBudget:
        """The budget of ``--gpu-memory`` / ``--host-memory`` sizes as given (None: measure this machine)."""
        sizes = {name: None if text is None else parse_bytes(text, flag_name(cls, name))
                 for name, text in (("device_bytes", device_bytes), ("host_bytes", host_bytes))}
        return cls(**sizes)
