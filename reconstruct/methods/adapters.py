"""Low-rank adapters for reconstruction: MaskLoRA, ScaleLoRA and plain LoRA.

One adapter class serves reconstruction and LoRAPrune, so it lives where the pruner may import it:
``pruners/lowrank.py`` (the three forms, their init and the per-layer seed are documented there).
"""

from pruners.lowrank import LowRankLinear, init_lora_a, layer_seed

__all__ = ["LowRankLinear", "init_lora_a", "layer_seed"]
