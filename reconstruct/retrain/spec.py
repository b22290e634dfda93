"""The model-level retraining job: which parameters, how long, how hard (PERP's global step).

Defaults follow PERP's retraining (ZIB-IOL/PERP ``main.py`` / ``runner.py``): AdamW at a peak
learning rate of 5e-4, weight decay 0, a linear warm-up over the first 10% of the steps and a linear
decay to 0 (the Hugging Face ``linear`` schedule with ``warmup_ratio=0.1``), LoRA rank 16, alpha 32.
"""

from __future__ import annotations

from dataclasses import dataclass

from reconstruct.methods.spec import DENSE_MERGE_MESSAGE

RETRAIN_METHODS = ("bias", "ln", "bias-ln", "masklora", "scalelora", "lora")
STREAM_MODES = ("auto", "always", "never")  # --stream: decide from memory, always stream, keep resident


@dataclass(frozen=True)
class RetrainSpec:
    """How the whole pruned model is retrained. Every field has a default; ``cli.py`` builds it once."""

    method: str = "bias-ln"  # one of RETRAIN_METHODS: what is trained in every block
    steps: int = 20  # optimizer steps (PERP: 20)
    batch: int = 2  # token windows per optimizer step (PERP: 1 × 2 accumulated)
    micro_batch: int = 1  # windows per forward/backward slice; gradients accumulate over the step
    seq_len: int = 256  # tokens per window, the BOS included when the tokenizer adds one
    lr: float = 5e-4  # AdamW peak learning rate (PERP)
    warmup: float = 0.1  # share of the steps the learning rate rises linearly from 0 (PERP: 0.1)
    weight_decay: float = 0.0  # AdamW decoupled weight decay (PERP: 0)
    rank: int = 16  # rank of the (Mask|Scale)LoRA adapters
    alpha: float = 32.0  # adapter delta scaled by alpha / rank (scalelora ignores it)
    seed: int = 0  # seeds the data windows, their order, the held-out split and adapter inits
    n_windows: int = 64  # token windows drawn from --data (training and validation together)
    val_fraction: float = 0.125  # share of the windows held out to judge the training; 0 = none
    eval_every: int = 5  # optimizer steps between validation evaluations
    allow_dense_merge: bool = False  # lora only: accept that merging fills the pruned positions
    stream: str = "auto"  # one of STREAM_MODES

    def __post_init__(self) -> None:
        if self.method not in RETRAIN_METHODS:
            raise ValueError(f"--method must be one of {', '.join(RETRAIN_METHODS)}; got {self.method!r}")
        if self.method == "lora" and not self.allow_dense_merge:
            raise ValueError(DENSE_MERGE_MESSAGE)
        checks = (
            (self.steps >= 1, f"--steps must be >= 1; got {self.steps}"),
            (self.batch >= 1, f"--samples-per-step must be >= 1; got {self.batch}"),
            (self.micro_batch >= 1, f"--batch-size must be >= 1; got {self.micro_batch}"),
            (self.seq_len >= 2, f"--seq-len must be >= 2; got {self.seq_len}"),
            (self.lr > 0, f"--lr must be > 0; got {self.lr}"),
            (0 <= self.warmup < 1, f"--warmup must be a fraction in [0, 1); got {self.warmup}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0; got {self.weight_decay}"),
            (self.rank >= 1, f"--rank must be >= 1; got {self.rank}"),
            (self.alpha > 0, f"--alpha must be > 0; got {self.alpha}"),
            (self.n_windows >= 1, f"--n-samples must be >= 1; got {self.n_windows}"),
            (0 <= self.val_fraction < 1, f"--val must be a fraction in [0, 1); got {self.val_fraction}"),
            (self.eval_every >= 1, f"--eval-every must be >= 1; got {self.eval_every}"),
            (self.stream in STREAM_MODES, f"--stream must be one of {', '.join(STREAM_MODES)}; got {self.stream!r}"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def fingerprint(self) -> dict:
        """The fields that decide the result (everything but how memory is used)."""
        fields = dict(self.__dict__)
        fields.pop("stream")
        return fields
