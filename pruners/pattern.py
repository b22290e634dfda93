"""The sparsity pattern a pruner must produce: unstructured (per row or per layer), N:M, or structured.

Structured patterns remove whole groups of weights across several linears of a block
(see :mod:`pruners.structured`): ``heads`` (attention heads: q/k/v rows and o columns) and
``channels`` (MLP intermediate channels: up/gate rows and down columns). Their ``sparsity`` is the
fraction of heads or channels removed per block, not of each linear's weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

UNSTRUCTURED = "unstructured"
N_OF_M = "nm"
HEADS = "heads"
CHANNELS = "channels"
STRUCTURED = (HEADS, CHANNELS)
MASK_SCOPES = ("row", "layer")
PATTERN_CHOICES = "'unstructured', N:M such as 2:4, 'heads' or 'channels'"

# The flags that set a pattern (``parse``), declared beside the fields as reconstruct.flags reads them
# (plain metadata: pruners/ imports nothing from reconstruct/).
PATTERN_FLAG = {"name": "--pattern", "help": (
    "'unstructured', N:M (N kept of every M along the input, e.g. 2:4), 'heads' (whole attention heads) or "
    "'channels' (MLP intermediate channels); heads/channels: --sparsity is the fraction of them removed per block, "
    "rounded to whole heads (0.2222 of 9 = 2).")}
SPARSITY_FLAG = {"name": "--sparsity", "unset": True, "help": (
    "Fraction of weights removed, in [0, 1) (heads/channels: of heads/channels removed per block); implied by N:M.")}
SCOPE_FLAG = {"name": "--mask-scope", "choices": MASK_SCOPES, "help": (
    "Unstructured: equal sparsity per output row or per layer.")}


@dataclass(frozen=True)
class SparsityPattern:
    """What fraction of a weight matrix is removed, and how the zeros are arranged.

    N:M follows the hardware convention: at most ``n`` non-zeros in every group of ``m``
    consecutive weights along the input dimension (2:4 keeps 2 of 4, i.e. 50% sparsity).
    """

    # "unstructured", "nm", "heads" or "channels" (--pattern also takes N:M itself)
    kind: str = field(default=UNSTRUCTURED, metadata={"flag": PATTERN_FLAG})
    # fraction of weights set to zero (structured: of heads / channels removed)
    sparsity: float = field(default=0.5, metadata={"flag": SPARSITY_FLAG})
    n: int | None = None  # kept weights per group (N:M only)
    m: int | None = None  # group size along the input dimension (N:M only)
    # unstructured only: equal sparsity per output row, or per whole layer
    scope: str = field(default="row", metadata={"flag": SCOPE_FLAG})

    @property
    def structured(self) -> bool:
        """True for ``heads`` and ``channels``: whole groups across several linears are removed."""
        return self.kind in STRUCTURED

    @property
    def label(self) -> str:
        """Short human form: ``unstructured 50%``, ``2:4``, ``heads 22%`` or ``channels 20%``."""
        if self.kind == N_OF_M:
            return f"{self.n}:{self.m}"
        return f"{self.kind} {self.sparsity:.0%}"

    @classmethod
    def parse(cls, pattern: str, sparsity: float | None, scope: str = "row") -> "SparsityPattern":
        """Build a pattern from the CLI's ``--pattern`` and ``--sparsity``.

        Args:
            pattern: ``"unstructured"``, ``"N:M"`` such as ``"2:4"``, ``"heads"`` or ``"channels"``.
            sparsity: fraction in [0, 1); for N:M it may be omitted (it is ``1 - N/M``); for heads and
                channels it is the fraction of heads / channels removed in every block (default 0.5).
            scope: ``"row"`` (every output row has the same sparsity) or ``"layer"``.

        Raises:
            ValueError: with the flag at fault and what is allowed.
        """
        if scope not in MASK_SCOPES:
            raise ValueError(f"--mask-scope must be one of {', '.join(MASK_SCOPES)}, got {scope!r}")
        if sparsity is not None and not (0.0 <= sparsity < 1.0):
            raise ValueError(f"--sparsity must be in [0, 1), got {sparsity}")
        if pattern == UNSTRUCTURED:
            return cls(kind=UNSTRUCTURED, sparsity=cls.sparsity if sparsity is None else float(sparsity), scope=scope)
        if pattern in STRUCTURED:
            return cls(kind=pattern, sparsity=cls.sparsity if sparsity is None else float(sparsity), scope="row")
        match = re.fullmatch(r"(\d+):(\d+)", pattern.strip())
        if not match:
            raise ValueError(f"--pattern must be {PATTERN_CHOICES}, got {pattern!r}")
        n, m = int(match.group(1)), int(match.group(2))
        if not (1 <= n < m):
            raise ValueError(f"--pattern {pattern}: N:M needs 1 <= N < M (N weights kept of every M)")
        implied = 1.0 - n / m
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise ValueError(
                f"--sparsity {sparsity} conflicts with --pattern {pattern}, which means sparsity {implied:g}; "
                "leave --sparsity out for N:M"
            )
        return cls(kind=N_OF_M, sparsity=implied, n=n, m=m, scope="row")
