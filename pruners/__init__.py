"""Mask makers (magnitude, Wanda, SparseGPT, LoRAPrune), the one mask-selection routine, calibration statistics."""

from pruners.base import Pruner
from pruners.masks import select_keep_mask
from pruners.pattern import SparsityPattern
from pruners.registry import PRUNER_NAMES, get_pruner
from pruners.stats import LayerStats

__all__ = ["PRUNER_NAMES", "LayerStats", "Pruner", "SparsityPattern", "get_pruner", "select_keep_mask"]
