"""The reconstruction job description: which method, how long, how hard.

Defaults are PERP's (Zimmer et al., arXiv 2312.15230; the official ZIB-IOL/PERP code, whose
reconstruction loop runs ``n_iterations`` AdamW steps over batches of the 128 calibration samples):

- lr 5e-4, rank 16, alpha 32, weight decay 0, MSE on the block output: PERP.
- steps 20, batch 1: PERP's code defaults (``n_iterations=20``, ``batch_size=1``). PERP warms the
  learning rate up over 10% of the steps; with 20 steps that wastes two, so we decay linearly to 0
  from the first step.
- micro_batch 1: samples per forward/backward slice; activation memory grows with it, and one sample
  of 2048 tokens already fills a GPU's matmuls for a 7B+ block.

Cost, measured on one 50%-magnitude-pruned SmolLM2-135M block (hidden 576, 16 samples x 256 tokens,
one CPU thread on a busy 2-core machine): the two full evaluations (before/after) take ~0.7 s; the
20 steps add ~2.5 s for bias-ln and ~3.5-4.5 s for the LoRA variants, so the default stays near the
~5 s per block that CI can pay. The block MSE fell to 0.92x (bias-ln), 0.93x (masklora), 0.85x
(scalelora, lora). Quality is bought with steps far more than with batch: 20x1 and 20x2 samples gave
the same MSE, 40x2 gave 0.86x (bias-ln) and 0.80x (masklora), 80x1 gave 0.73x (scalelora), at a
time linear in steps x batch. On a GPU, raise ``steps`` (a few hundred) before ``batch_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

METHOD_NAMES = ("none", "bias", "ln", "bias-ln", "masklora", "scalelora", "lora")
LOW_RANK_METHODS = ("masklora", "scalelora", "lora")
SPARSITY_PRESERVING = ("none", "bias", "ln", "bias-ln", "masklora", "scalelora")

DENSE_MERGE_MESSAGE = (
    "--method lora densifies the pruned weights when merged; pass --allow-dense-merge to accept that"
)


@dataclass(frozen=True)
class ReconSpec:
    """How one block is reconstructed. Every field has a default; ``cli.py`` builds it once."""

    method: str = "bias-ln"  # one of METHOD_NAMES: what is trained (see reconstruct.methods)
    steps: int = 20  # optimizer steps per block (PERP's code default); 0 = no training (merge only)
    lr: float = 5e-4  # AdamW peak learning rate, decayed linearly to 0 over `steps` (PERP)
    rank: int = 16  # rank r of the (Mask|Scale)LoRA adapters (PERP)
    alpha: float = 32.0  # lora/masklora scale B A by alpha / rank (PERP: 32); scalelora ignores it
    batch_size: int = 1  # calibration samples per optimizer step (PERP: 1; clamped to n_samples)
    weight_decay: float = 0.0  # AdamW decoupled weight decay (PERP: 0)
    micro_batch: int = 1  # samples per forward/backward slice; gradients accumulate to batch_size
    allow_dense_merge: bool = False  # lora only: accept that merging fills the pruned positions
    granularity: str = "block"  # what is matched: "block", "sublayer" (attention, MLP) or "linear"
    target: str = "dense"  # "dense": block_dense(x_dense) (PERP); "local": block_dense(x_sparse)

    def __post_init__(self) -> None:
        if self.method not in METHOD_NAMES:
            raise ValueError(f"--method must be one of {', '.join(METHOD_NAMES)}; got {self.method!r}")
        if self.method == "lora" and not self.allow_dense_merge:
            raise ValueError(DENSE_MERGE_MESSAGE)
        if self.steps < 0:
            raise ValueError(f"reconstruction steps must be >= 0; got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"reconstruction learning rate must be > 0; got {self.lr}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1; got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0; got {self.alpha}")
        if self.batch_size < 1:
            raise ValueError(f"reconstruction batch size must be >= 1; got {self.batch_size}")
        if self.micro_batch < 1:
            raise ValueError(f"reconstruction micro-batch must be >= 1; got {self.micro_batch}")
        if self.weight_decay < 0:
            raise ValueError(f"weight decay must be >= 0; got {self.weight_decay}")
        if self.granularity not in ("block", "sublayer", "linear"):
            raise ValueError(f"--granularity must be one of block, sublayer, linear; got {self.granularity!r}")
        if self.target not in ("dense", "local"):
            raise ValueError(f"--target must be one of dense, local; got {self.target!r}")
