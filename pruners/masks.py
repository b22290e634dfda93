"""The one mask-selection routine: scores in, ``keep_mask`` out, with exact pattern guarantees.

Every pruner turns its importance scores into a mask here, so the counting rules live in one place:

- unstructured, scope ``"row"``: every output row loses exactly ``int(in * sparsity)`` weights;
- unstructured, scope ``"layer"``: the matrix loses exactly ``int(out * in * sparsity)`` weights;
- N:M: every group of ``m`` consecutive input columns loses exactly ``m - n`` weights.

Lower score = pruned first. Ties are broken by position: among equal scores the weight with the
lower (flattened) index is pruned first, so equal inputs give equal masks on every call and device
(the same masks a stable sort would give; per-row selection finds them with ``kthvalue``, linear time).

Nesting (``within``): iterative pruning (``--cycles``) passes the previous keep mask; weights outside
it are pruned first, whatever their score, so the new mask is a subset of the old one. The pattern's
counts stay exact; a previous mask that already prunes more than the pattern allows is an error.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pruners.pattern import N_OF_M, UNSTRUCTURED, SparsityPattern

# Rows selected at once for row-scope selection: bounds the temporaries (a few bytes a weight).
ROW_CHUNK_ELEMENTS = 1 << 24


def num_pruned(count: int, sparsity: float) -> int:
    """How many of ``count`` weights a sparsity removes: ``int(count * sparsity)`` (floor, as Wanda).

    All exact counts in the project go through this one expression, so block-wise allocations
    (SparseGPT) telescope to the same totals as whole-matrix selection.
    """
    return int(count * sparsity)


def check_nm_divisible(in_features: int, pattern: SparsityPattern, out_features: int | None = None) -> None:
    """Raise a clear ``ValueError`` when an N:M pattern cannot tile a layer's input dimension.

    Args:
        in_features: the layer's input size (columns of the ``(out, in)`` weight).
        pattern: the sparsity pattern; only N:M patterns are checked.
        out_features: optional, only to name the layer's shape in the message.
    """
    if pattern.kind != N_OF_M:
        return
    if in_features % pattern.m != 0:
        shape = f"({out_features}, {in_features})" if out_features is not None else f"with {in_features} inputs"
        raise ValueError(
            f"--pattern {pattern.n}:{pattern.m} needs the input size of every pruned layer to be a multiple "
            f"of {pattern.m}, but a layer of shape {shape} has {in_features} input features; "
            "use --pattern unstructured for this model"
        )


def keep_mask_prune_lowest(scores: Tensor, k: int, per_row: bool) -> Tensor:
    """Prune exactly the ``k`` lowest scores per row (``per_row``) or in the whole matrix.

    Args:
        scores: ``(rows, cols)`` importance, higher = more important.
        k: number of weights to prune per row (``per_row``) or in total; ``0 <= k <= size``.
        per_row: select within each row, or over the flattened matrix.

    Returns:
        ``(rows, cols)`` bool ``keep_mask``, True where the weight survives.
    """
    rows, cols = scores.shape
    keep = torch.ones(rows, cols, dtype=torch.bool, device=scores.device)  # (rows, cols)
    if k == 0:
        return keep
    if per_row:
        assert 0 <= k <= cols, (k, cols)
        step = max(1, ROW_CHUNK_ELEMENTS // max(cols, 1))
        for r0 in range(0, rows, step):
            keep[r0 : r0 + step] = ~_lowest_k_per_row(scores[r0 : r0 + step], k)
    else:
        assert 0 <= k <= rows * cols, (k, rows * cols)
        order = torch.argsort(scores.reshape(-1), stable=True)  # (rows * cols,)
        keep.view(-1)[order[:k]] = False
    return keep


def _lowest_k_per_row(scores: Tensor, k: int) -> Tensor:
    """``(rows, cols)`` bool, True at the ``k`` lowest scores of each row, ties to the lower column.

    ``kthvalue`` finds each row's threshold in linear time; every score below it is pruned, and of
    the scores equal to it the first ``k - (number below)`` in column order. This is exactly the
    set a stable ascending sort puts first, without sorting the row.
    """
    threshold = scores.kthvalue(k, dim=1, keepdim=True).values  # (rows, 1)
    below = scores < threshold  # (rows, cols)
    tied = scores == threshold  # (rows, cols)
    still_needed = k - below.sum(dim=1, keepdim=True)  # (rows, 1), >= 1
    return below | (tied & (tied.cumsum(dim=1, dtype=torch.int32) <= still_needed))


def keep_mask_n_of_m(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the ``n`` highest of every ``m`` consecutive columns (``cols % m == 0`` required).

    Args:
        scores: ``(rows, cols)`` importance, higher = more important.
        n: weights kept per group.
        m: group size along the columns.

    Returns:
        ``(rows, cols)`` bool ``keep_mask`` with exactly ``m - n`` False in every group.
    """
    rows, cols = scores.shape
    assert cols % m == 0, (cols, m)
    groups = scores.reshape(rows, cols // m, m)  # (rows, groups, m)
    order = torch.argsort(groups, dim=2, stable=True)  # (rows, groups, m)
    keep = torch.ones_like(groups, dtype=torch.bool)  # (rows, groups, m)
    keep.scatter_(2, order[:, :, : m - n], False)
    return keep.reshape(rows, cols)


def _check_scores(scores: Tensor) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D (out, in) tensor, got shape {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError(
            "pruning scores contain NaN: the layer's weight or its calibration statistics are not finite"
        )


def _check_kind(pattern: SparsityPattern) -> None:
    if pattern.kind not in (UNSTRUCTURED, N_OF_M):
        raise ValueError(f"--pattern must be 'unstructured' or N:M such as 2:4, got kind {pattern.kind!r}")


def restrict_scores(scores: Tensor, within: Tensor | None) -> Tensor:
    """Scores with every position outside ``within`` set to ``-inf`` (pruned first); ``scores`` if None.

    Args:
        scores: ``(out, in)`` importance.
        within: ``(out, in)`` bool previous keep mask, or None.
    """
    if within is None:
        return scores
    if tuple(within.shape) != tuple(scores.shape):
        raise ValueError(f"previous keep mask has shape {tuple(within.shape)}, the scores {tuple(scores.shape)}")
    lowest = torch.tensor(float("-inf"), dtype=torch.float32, device=scores.device)
    return torch.where(within.to(device=scores.device, dtype=torch.bool), scores.float(), lowest)


def check_nested(keep_mask: Tensor, within: Tensor | None, pattern: SparsityPattern) -> Tensor:
    """Return ``keep_mask`` after checking it is a subset of ``within`` (when given)."""
    if within is not None and bool((keep_mask & ~within.to(device=keep_mask.device, dtype=torch.bool)).any()):
        raise ValueError(
            f"--pattern {pattern.label} keeps weights that an earlier pruning cycle removed: the earlier "
            "mask is sparser than this pattern allows (use a schedule that only grows the sparsity)"
        )
    return keep_mask


def select_keep_mask(scores: Tensor, pattern: SparsityPattern, within: Tensor | None = None) -> Tensor:
    """Turn importance scores into a ``keep_mask`` that meets ``pattern`` exactly.

    Args:
        scores: ``(out, in)`` importance, higher = more important (any real dtype).
        pattern: unstructured (scope ``"row"`` or ``"layer"``) or N:M along the input dimension.
        within: optional ``(out, in)`` bool keep mask of an earlier pruning step; the result is a
            subset of it (weights outside it are pruned first).

    Returns:
        ``(out, in)`` bool ``keep_mask``, True = the weight survives.

    Raises:
        ValueError: N:M with ``in`` not a multiple of ``m``; scores not 2-D or containing NaN;
            ``within`` already prunes more than the pattern allows.
    """
    _check_scores(scores)
    _check_kind(pattern)
    scores = restrict_scores(scores, within)
    out_features, in_features = scores.shape
    if pattern.kind == N_OF_M:
        check_nm_divisible(in_features, pattern, out_features)
        keep = keep_mask_n_of_m(scores, pattern.n, pattern.m)
    elif pattern.scope == "row":
        keep = keep_mask_prune_lowest(scores, num_pruned(in_features, pattern.sparsity), per_row=True)
    else:
        keep = keep_mask_prune_lowest(scores, num_pruned(out_features * in_features, pattern.sparsity), per_row=False)
    return check_nested(keep, within, pattern)


def block_prune_count(pattern: SparsityPattern, rows: int, col_start: int, col_end: int) -> int:
    """Weights an unstructured pattern prunes in columns ``[col_start, col_end)`` (cumulative rounding).

    Per row (scope ``"row"``) or for the whole block (scope ``"layer"``). Summed over consecutive
    blocks that cover all ``in`` columns, the counts telescope to exactly ``int(in * s)`` per row, or
    ``int(out * in * s)`` per layer: the same totals as :func:`select_keep_mask`.
    """
    s = pattern.sparsity
    if pattern.scope == "row":
        return num_pruned(col_end, s) - num_pruned(col_start, s)
    return num_pruned(rows * col_end, s) - num_pruned(rows * col_start, s)


def select_block_keep_mask(scores: Tensor, pattern: SparsityPattern, col_start: int) -> Tensor:
    """Select the ``keep_mask`` of one column block so that all blocks together meet ``pattern`` exactly.

    Used by pruners that decide the mask block by block (SparseGPT). For unstructured patterns the
    block's share of the pruned count comes from :func:`block_prune_count`; for N:M the block must be
    made of whole groups.

    Args:
        scores: ``(out, width)`` importance of columns ``[col_start, col_start + width)`` of the layer.
        pattern: the layer's sparsity pattern.
        col_start: index of the block's first column in the full layer.

    Returns:
        ``(out, width)`` bool ``keep_mask`` for the block.
    """
    _check_scores(scores)
    _check_kind(pattern)
    rows, width = scores.shape
    if pattern.kind == N_OF_M:
        if col_start % pattern.m != 0 or width % pattern.m != 0:
            raise ValueError(
                f"column block [{col_start}, {col_start + width}) does not align with the groups of "
                f"--pattern {pattern.n}:{pattern.m}"
            )
        return keep_mask_n_of_m(scores, pattern.n, pattern.m)
    k = block_prune_count(pattern, rows, col_start, col_start + width)
    return keep_mask_prune_lowest(scores, k, per_row=pattern.scope == "row")
