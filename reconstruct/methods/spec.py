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

from reconstruct.flags import Flag, FlagError, flag
from reconstruct.methods.loss import LOSSES

METHOD_NAMES = ("none", "bias", "ln", "bias-ln", "masklora", "scalelora", "lora")
LOW_RANK_METHODS = ("masklora", "scalelora", "lora")
SPARSITY_PRESERVING = ("none", "bias", "ln", "bias-ln", "masklora", "scalelora")
GRANULARITIES = ("block", "sublayer", "linear")  # what a reconstruction unit is (loop.objective)
TARGETS = ("dense", "local")  # which stream feeds the dense target (loop.objective)

AUTO_METHOD = "masklora"  # what --method auto runs, at every sparsity and pattern; ReconSpec's default

# Flags that model-level retraining (RetrainSpec) shares.
RANK = Flag("--rank", "LoRA rank (masklora, scalelora, lora).", min=1)
ALPHA = Flag("--alpha", "LoRA alpha; the update is scaled by alpha/rank.", min=0.0)
ALLOW_DENSE_MERGE = Flag("--allow-dense-merge", "--method lora only: accept that merging refills pruned weights.")

DENSE_MERGE_PROBLEM = f"lora densifies the pruned weights when merged; pass {ALLOW_DENSE_MERGE.name} to accept that"
DENSE_MERGE_MESSAGE = f"--method {DENSE_MERGE_PROBLEM}"  # what --method lora alone is told


def resolve_method(method: str) -> str:
    """The reconstruction method a job runs: ``--method`` itself, or what ``auto`` means.

    ``auto`` was bias-ln below 60% sparsity (it trains 0.18% of SmolLM2's block parameters, MaskLoRA
    4.6%) until issue 20 measured what bias-ln does to text unlike the calibration: after Wanda 50%
    on SmolLM2 it lowered WikiText-2 perplexity (54.1 → 46.5–47.3) and raised perplexity on PIQA's
    goal-and-solution text above the unrepaired model's (76.9 → 78.8–81.1), with or without the
    guard; MaskLoRA lowered both (42.0, 70.9–71.4), and beat bias-ln at every sparsity and pattern
    measured (docs/benchmarks.md). So ``auto`` is MaskLoRA everywhere.

    Args:
        method: the ``--method`` value (``auto`` or a method name).

    Returns:
        ``method`` unless it is ``auto``: then :data:`AUTO_METHOD`.
    """
    if method != "auto":
        return method
    return AUTO_METHOD


@dataclass(frozen=True)
class ReconSpec:
    """How one block is reconstructed. Every field has a default; the command line builds it once.

    ``unset`` flags: the command line passes them only when given (``--recon-steps`` and
    ``--recon-epochs`` exclude each other).
    """

    # one of METHOD_NAMES: what is trained (see reconstruct.methods); the command line's auto is AUTO_METHOD
    method: str = flag(AUTO_METHOD, "--method", f"Reconstruction: auto = {AUTO_METHOD} (bias-ln, cheaper, made text "
                       "unlike the calibration worse: docs/benchmarks.md).", choices=("auto", *METHOD_NAMES),
                       cli_default="auto")
    # optimizer steps per block; 0 = no training (merge only)
    steps: int = flag(64, "--recon-steps", "Optimizer steps per block.", min=0, unset=True)
    # AdamW peak learning rate, decayed linearly to 0 over `steps`
    lr: float = flag(5e-3, "--lr", "AdamW peak learning rate (linear decay to 0).", min=0.0, unset=True)
    rank: int = RANK.field(16)  # rank r of the (Mask|Scale)LoRA adapters (PERP)
    alpha: float = ALPHA.field(32.0)  # lora/masklora scale B A by alpha / rank (PERP: 32); scalelora ignores it
    # calibration samples per optimizer step (clamped to n_samples)
    batch_size: int = flag(2, "--recon-samples-per-step", "Reconstruction: calibration samples per optimizer step "
                           "(their forwards go --batch-size at a time).", min=1, unset=True)
    # AdamW decoupled weight decay (PERP: 0)
    weight_decay: float = flag(0.0, "--weight-decay", "AdamW weight decay.", min=0.0, unset=True)
    micro_batch: int = 1  # samples per forward/backward slice; gradients accumulate to batch_size
    allow_dense_merge: bool = ALLOW_DENSE_MERGE.field(False)  # lora only: accept that merging fills the pruned positions
    # what is matched: "block", "sublayer" (attention, MLP) or "linear"
    granularity: str = flag("block", "--granularity", "What reconstruction matches: the whole block, each sublayer "
                            "(attention and MLP separately) or each linear.", choices=GRANULARITIES)
    # "dense": block_dense(x_dense) (PERP); "local": block_dense(x_sparse)
    target: str = flag("dense", "--target", "Reconstruction target: dense = dense block on the dense stream (PERP), "
                       "local = dense block on the pruned stream.", choices=TARGETS)
    # what training minimises and the guard judges: reconstruct.methods.loss
    loss: str = flag("token-relative", "--recon-loss", "What reconstruction minimises and the guard judges: mse over "
                     "every element (PERP), or token-relative = each token's squared error over its target's squared "
                     "norm, so a few massive-activation tokens do not outweigh the rest.", choices=LOSSES)
    # budget in passes over the training samples; overrides `steps` when set
    epochs: float | None = flag(None, "--recon-epochs", "Budget in passes over the training samples instead of "
                                "--recon-steps: steps = ceil(E x training samples / --recon-samples-per-step).",
                                show_default="off")
    # share of calibration samples held out for validation; 0 = none
    val_fraction: float = flag(0.125, "--recon-val", "Share of the calibration samples held out to validate each "
                               "repair, in [0, 1) (at least one sample; 0 = none, every sample trains).")
    # optimizer steps between validation evaluations (guard on)
    eval_every: int = flag(8, "--recon-eval-every", "Guard: validation error measured every this many steps.", min=1)
    # evaluations without improvement before training stops (guard on)
    patience: int = flag(3, "--recon-patience", "Guard: stop after this many evaluations without improvement.", min=1)
    # keep the best evaluation's parameters; undo a repair not better on validation
    guard: bool = flag(True, "--recon-guard", "Keep the best validation step's parameters and undo a repair that is "
                       "not better on the held-out samples than the pruned block (--no-recon-guard: train all steps, "
                       "keep every repair; the error is still measured).")

    def __post_init__(self) -> None:
        checks = (
            (self.method in METHOD_NAMES, "method", f"must be one of {', '.join(METHOD_NAMES)}; got {self.method!r}"),
            (self.method != "lora" or self.allow_dense_merge, "method", DENSE_MERGE_PROBLEM),
            (self.steps >= 0, "steps", f"must be >= 0; got {self.steps}"),
            (self.lr > 0, "lr", f"must be > 0; got {self.lr}"),
            (self.rank >= 1, "rank", f"must be >= 1; got {self.rank}"),
            (self.alpha > 0, "alpha", f"must be > 0; got {self.alpha}"),
            (self.batch_size >= 1, "batch_size", f"must be >= 1; got {self.batch_size}"),
            (self.weight_decay >= 0, "weight_decay", f"must be >= 0; got {self.weight_decay}"),
            (self.granularity in GRANULARITIES, "granularity",
             f"must be one of {', '.join(GRANULARITIES)}; got {self.granularity!r}"),
            (self.target in TARGETS, "target", f"must be one of {', '.join(TARGETS)}; got {self.target!r}"),
            (self.loss in LOSSES, "loss", f"must be one of {', '.join(LOSSES)}; got {self.loss!r}"),
            (self.epochs is None or (math.isfinite(self.epochs) and self.epochs > 0), "epochs",
             f"must be > 0; got {self.epochs}"),
            (0 <= self.val_fraction < 1, "val_fraction", f"must be a fraction in [0, 1); got {self.val_fraction}"),
            (self.eval_every >= 1, "eval_every", f"must be >= 1; got {self.eval_every}"),
            (self.patience >= 1, "patience", f"must be >= 1; got {self.patience}"),
        )
        for ok, field, problem in checks:
            if not ok:
                raise FlagError(ReconSpec, field, problem)
        if self.micro_batch < 1:
            raise ValueError(f"reconstruction micro-batch must be >= 1; got {self.micro_batch}")

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
