"""The reconstruction job description: which method, how long, how hard.

Rank 16, alpha 32, weight decay 0 and the MSE on the block output are PERP's (Zimmer et al.,
arXiv 2312.15230; its code runs ``n_iterations`` AdamW steps over batches of the calibration
samples, by default 20 steps of 1 sample at lr 5e-4). With so few steps the block error barely
moves, so our defaults spend more: 64 steps of 2 samples at a peak lr of 5e-3, decayed linearly to 0.

Measured on SmolLM2-135M block 5 after 70% Wanda pruning (16 × 256 WikiText-2 tokens; ratio of the
block MSE after/before reconstruction, trained on the MSE (``loss="mse"``); reproduce with the
script in docs/benchmarks.md):

| method    | 20×1 @ 5e-4 (PERP) | 20×1 @ 2e-3 | 64×2 @ 5e-4 | 64×2 @ 2e-3 | 64×2 @ 5e-3 | 128×4 @ 2e-3 |
|-----------|------|------|------|------|------|------|
| bias-ln   | 0.95 | 0.89 | 0.90 | 0.83 | 0.80 | 0.80 |
| masklora  | 0.96 | 0.84 | 0.84 | 0.70 | 0.61 | 0.59 |
| scalelora | 0.94 | 0.87 | 0.87 | 0.81 | 0.78 |  —   |

64×2 @ 5e-3 is within a few percent of 4× the work (128×4) at a third of the time. On a GPU,
raise ``steps`` (a few hundred) before ``batch_size``. ``micro_batch`` bounds activation memory:
one sample of 2048 tokens already fills a GPU's matmuls for a 7B+ block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from reconstruct.methods.loss import LOSSES

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
    steps: int = 64  # optimizer steps per block; 0 = no training (merge only)
    lr: float = 5e-3  # AdamW peak learning rate, decayed linearly to 0 over `steps`
    rank: int = 16  # rank r of the (Mask|Scale)LoRA adapters (PERP)
    alpha: float = 32.0  # lora/masklora scale B A by alpha / rank (PERP: 32); scalelora ignores it
    batch_size: int = 2  # calibration samples per optimizer step (clamped to n_samples)
    weight_decay: float = 0.0  # AdamW decoupled weight decay (PERP: 0)
    micro_batch: int = 1  # samples per forward/backward slice; gradients accumulate to batch_size
    allow_dense_merge: bool = False  # lora only: accept that merging fills the pruned positions
    granularity: str = "block"  # what is matched: "block", "sublayer" (attention, MLP) or "linear"
    target: str = "dense"  # "dense": block_dense(x_dense) (PERP); "local": block_dense(x_sparse)
    loss: str = "token-relative"  # what training minimises and the guard judges: reconstruct.methods.loss
    epochs: float | None = None  # budget in passes over the training samples; overrides `steps` when set
    val_fraction: float = 0.125  # share of calibration samples held out for validation; 0 = none
    eval_every: int = 8  # optimizer steps between validation evaluations (guard on)
    patience: int = 3  # evaluations without improvement before training stops (guard on)
    guard: bool = True  # keep the best evaluation's parameters; undo a repair not better on validation

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
        if self.loss not in LOSSES:
            raise ValueError(f"--recon-loss must be one of {', '.join(LOSSES)}; got {self.loss!r}")
        if self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"--recon-epochs must be > 0; got {self.epochs}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--recon-val must be a fraction in [0, 1); got {self.val_fraction}")
        if self.eval_every < 1:
            raise ValueError(f"--recon-eval-every must be >= 1; got {self.eval_every}")
        if self.patience < 1:
            raise ValueError(f"--recon-patience must be >= 1; got {self.patience}")

    def steps_for(self, n_train: int) -> int:
        """Optimizer steps for ``n_train`` training samples: ``steps``, or ``ceil(epochs * n_train / batch)``.

        Args:
            n_train: calibration samples training draws from (all ranks together).

        Returns:
            The step budget; with ``epochs`` set, the batch is clamped to ``n_train`` as training does.
        """
        if self.epochs is None or n_train < 1:
            return self.steps
        return math.ceil(self.epochs * n_train / min(self.batch_size, n_train))

    def passes(self, n_train: int) -> float:
        """How many times the step budget goes over ``n_train`` samples (epochs)."""
        if n_train < 1:
            return 0.0
        return self.steps_for(n_train) * min(self.batch_size, n_train) / n_train
