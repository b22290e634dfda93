"""Shared case table for the pruner tests: the sparsity patterns every test runs over."""

from pruners.pattern import SparsityPattern

PATTERNS = {
    "row50": SparsityPattern(sparsity=0.5, scope="row"),
    "row70": SparsityPattern(sparsity=0.7, scope="row"),
    "layer50": SparsityPattern(sparsity=0.5, scope="layer"),
    "layer70": SparsityPattern(sparsity=0.7, scope="layer"),
    "2:4": SparsityPattern.parse("2:4", None),
    "4:8": SparsityPattern.parse("4:8", None),
    "1:4": SparsityPattern.parse("1:4", None),
    "row0": SparsityPattern(sparsity=0.0, scope="row"),
    "layer0": SparsityPattern(sparsity=0.0, scope="layer"),
}


def mask_group(pattern: SparsityPattern) -> str | int:
    """Where ``pattern`` counts its kept weights, as ``tolerances.assert_masks_agree`` takes it."""
    return pattern.m if pattern.kind == "nm" else pattern.scope
