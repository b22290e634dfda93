"""select_keep_mask and the block-wise selection: exact counts, ties, determinism, errors."""

from __future__ import annotations

import pytest
import torch

from pruners import SparsityPattern, select_keep_mask
from pruners.masks import block_prune_count, keep_mask_prune_lowest, select_block_keep_mask

from pruner_cases import PATTERNS  # noqa: E402  (the shared case table)
SHAPES = [(16, 64), (7, 40), (33, 96)]


def assert_exact(keep: torch.Tensor, pattern: SparsityPattern) -> None:
    out, inp = keep.shape
    assert keep.dtype == torch.bool
    if pattern.kind == "nm":
        kept = keep.reshape(out, inp // pattern.m, pattern.m).sum(-1)
        assert torch.all(kept == pattern.n)
    elif pattern.scope == "row":
        assert torch.all((~keep).sum(1) == int(inp * pattern.sparsity))
    else:
        assert int((~keep).sum()) == int(out * inp * pattern.sparsity)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(PATTERNS))
def test_exact_counts(name, shape):
    pattern = PATTERNS[name]
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    keep = select_keep_mask(scores, pattern)
    assert keep.shape == scores.shape
    assert_exact(keep, pattern)
    if pattern.sparsity == 0.0:
        assert keep.all()


@pytest.mark.parametrize("name", list(PATTERNS))
def test_keeps_highest_scores(name):
    pattern = PATTERNS[name]
    scores = torch.randn(12, 48, generator=torch.Generator().manual_seed(1))
    keep = select_keep_mask(scores, pattern)
    if pattern.sparsity == 0.0:
        return
    if pattern.kind == "nm":
        s = scores.reshape(12, -1, pattern.m)
        k = keep.reshape(12, -1, pattern.m)
        kept_min = s.masked_fill(~k, float("inf")).amin(-1)
        pruned_max = s.masked_fill(k, float("-inf")).amax(-1)
        assert torch.all(kept_min >= pruned_max)
    elif pattern.scope == "row":
        kept_min = scores.masked_fill(~keep, float("inf")).amin(1)
        pruned_max = scores.masked_fill(keep, float("-inf")).amax(1)
        assert torch.all(kept_min >= pruned_max)
    else:
        assert scores[keep].min() >= scores[~keep].max()


@pytest.mark.parametrize("name", list(PATTERNS))
def test_ties_deterministic_and_lowest_index_first(name):
    pattern = PATTERNS[name]
    scores = torch.zeros(8, 32)  # all tied
    first = select_keep_mask(scores, pattern)
    for _ in range(3):
        assert torch.equal(select_keep_mask(scores.clone(), pattern), first)
    assert_exact(first, pattern)
    if pattern.kind == "nm":
        expect = torch.arange(pattern.m) >= pattern.m - pattern.n  # the first m-n of each group go
        assert torch.equal(first.reshape(8, -1, pattern.m), expect.expand(8, 32 // pattern.m, pattern.m))
    elif pattern.scope == "row":
        k = int(32 * pattern.sparsity)
        assert torch.equal(first, (torch.arange(32) >= k).expand(8, 32))
    else:
        k = int(8 * 32 * pattern.sparsity)
        assert torch.equal(first.reshape(-1), torch.arange(8 * 32) >= k)


@pytest.mark.parametrize("seed", range(6))
def test_row_selection_equals_a_stable_sort_with_partial_ties(seed):
    """kthvalue + tie ranking prunes exactly what a stable ascending sort puts first, for every k."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = 7, 13
    scores = torch.randint(0, 4, (rows, cols), generator=generator).float()  # (rows, cols), many ties
    scores[0, 3] = float("-inf")  # outside an earlier keep mask
    scores[1, :] = 2.0  # a whole row tied
    for k in range(cols + 1):
        expected = torch.ones(rows, cols, dtype=torch.bool)
        expected.scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, :k], False)
        assert torch.equal(keep_mask_prune_lowest(scores, k, per_row=True), expected), k


def test_row_chunking_matches_unchunked(monkeypatch):
    scores = torch.randn(50, 30, generator=torch.Generator().manual_seed(2))
    pattern = PATTERNS["row70"]
    whole = select_keep_mask(scores, pattern)
    monkeypatch.setattr("pruners.masks.ROW_CHUNK_ELEMENTS", 64)  # two rows per chunk
    assert torch.equal(select_keep_mask(scores, pattern), whole)


def test_nm_indivisible_raises_naming_size_and_pattern():
    with pytest.raises(ValueError, match=r"--pattern 2:4.*\(8, 30\).*30 input features"):
        select_keep_mask(torch.rand(8, 30), PATTERNS["2:4"])
    with pytest.raises(ValueError, match="4:8"):
        select_keep_mask(torch.rand(8, 36), PATTERNS["4:8"])


def test_nan_scores_rejected():
    scores = torch.rand(4, 8)
    scores[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        select_keep_mask(scores, PATTERNS["row50"])


@pytest.mark.parametrize("name", ["row50", "row70", "layer50", "layer70", "2:4", "4:8", "1:4", "row0"])
@pytest.mark.parametrize("block", [8, 24, 40])
def test_block_selection_composes_to_exact_pattern(name, block):
    pattern = PATTERNS[name]
    if pattern.kind == "nm" and block % pattern.m:
        pytest.skip("blocks must hold whole groups")
    out, inp = 9, 120
    scores = torch.rand(out, inp, generator=torch.Generator().manual_seed(3))
    keep = torch.cat(
        [select_block_keep_mask(scores[:, i : i + block], pattern, i) for i in range(0, inp, block)], dim=1
    )
    assert_exact(keep, pattern)
    if pattern.kind == "unstructured":
        total = sum(block_prune_count(pattern, out, i, min(i + block, inp)) for i in range(0, inp, block))
        per = inp if pattern.scope == "row" else out * inp
        assert total == int(per * pattern.sparsity)


def test_block_selection_rejects_misaligned_nm_block():
    with pytest.raises(ValueError, match="align"):
        select_block_keep_mask(torch.rand(4, 8), PATTERNS["2:4"], 2)
