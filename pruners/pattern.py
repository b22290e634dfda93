"""The sparsity pattern a pruner must produce: unstructured (per row or per layer) or N:M."""

from __future__ import annotations

import re
from dataclasses import dataclass

UNSTRUCTURED = "unstructured"
N_OF_M = "nm"
MASK_SCOPES = ("row", "layer")


@dataclass(frozen=True)
class SparsityPattern:
    """What fraction of a weight matrix is removed, and how the zeros are arranged.

    N:M follows the hardware convention: at most ``n`` non-zeros in every group of ``m``
    consecutive weights along the input dimension (2:4 keeps 2 of 4, i.e. 50% sparsity).
    """

    kind: str = UNSTRUCTURED  # "unstructured" or "nm"
    sparsity: float = 0.5  # fraction of weights set to zero
    n: int | None = None  # kept weights per group (N:M only)
    m: int | None = None  # group size along the input dimension (N:M only)
    scope: str = "row"  # unstructured only: equal sparsity per output row, or per whole layer

    @property
    def label(self) -> str:
        """Short human form: ``unstructured-50%`` or ``2:4``."""
        if self.kind == N_OF_M:
            return f"{self.n}:{self.m}"
        return f"unstructured {self.sparsity:.0%}"

    @classmethod
    def parse(cls, pattern: str, sparsity: float | None, scope: str = "row") -> "SparsityPattern":
        """Build a pattern from the CLI's ``--pattern`` and ``--sparsity``.

        Args:
            pattern: ``"unstructured"`` or ``"N:M"`` such as ``"2:4"``.
            sparsity: fraction in [0, 1); for N:M it may be omitted (it is ``1 - N/M``).
            scope: ``"row"`` (every output row has the same sparsity) or ``"layer"``.

        Raises:
            ValueError: with the flag at fault and what is allowed.
        """
        if scope not in MASK_SCOPES:
            raise ValueError(f"--mask-scope must be one of {', '.join(MASK_SCOPES)}, got {scope!r}")
        if sparsity is not None and not (0.0 <= sparsity < 1.0):
            raise ValueError(f"--sparsity must be in [0, 1), got {sparsity}")
        if pattern == UNSTRUCTURED:
            return cls(kind=UNSTRUCTURED, sparsity=0.5 if sparsity is None else float(sparsity), scope=scope)
        match = re.fullmatch(r"(\d+):(\d+)", pattern.strip())
        if not match:
            raise ValueError(f"--pattern must be 'unstructured' or N:M such as 2:4, got {pattern!r}")
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
