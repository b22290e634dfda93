"""The model-level retraining job: which parameters, how long, how hard (PERP's global step).

Defaults follow PERP's retraining (ZIB-IOL/PERP ``main.py`` / ``runner.py``): AdamW at a peak
learning rate of 5e-4, weight decay 0, a linear warm-up over the first 10% of the steps and a linear
decay to 0 (the Hugging Face ``linear`` schedule with ``warmup_ratio=0.1``), LoRA rank 16, alpha 32.
"""

from __future__ import annotations

from dataclasses import dataclass

from reconstruct.flags import FlagError, flag
from reconstruct.methods.spec import ALLOW_DENSE_MERGE, ALPHA, DENSE_MERGE_PROBLEM, RANK

RETRAIN_METHODS = ("bias", "ln", "bias-ln", "masklora", "scalelora", "lora")
STAGE_PREFIX = "--retrain-"  # run's retraining stage names a `stage` field's flag so: --lr is --retrain-lr there
STREAM_MODES = ("auto", "always", "never")  # --stream: decide from memory, always stream, keep resident
LOSSES = ("lm", "kd", "lm+kd")  # --loss: causal LM, distillation from the dense teacher, the sum of the two means
DISTILLATION_FIELDS = ("kd_temperature", "kd_top_k")  # in the fingerprint only when the loss distils

# RetrainSpec fields that run's retraining stage takes from run's own flags of the same name (rank, alpha,
# seed, --batch-size, --allow-dense-merge: reconstruct.cli.job_options.retrain_stage); the stage's other
# unmarked fields keep their defaults there.
RUN_SHARED_FIELDS = ("micro_batch", "rank", "alpha", "seed", "allow_dense_merge")


def stage_flag_name(name: str) -> str:
    """The flag of ``run``'s retraining stage for ``reconstruct retrain``'s ``name`` (``--lr`` → ``--retrain-lr``)."""
    return STAGE_PREFIX + name.removeprefix("--")


@dataclass(frozen=True)
class RetrainSpec:
    """How the whole pruned model is retrained. Every field has a default; the command line builds it once.

    Each field's flag is ``reconstruct retrain``'s; a field marked ``stage`` is also set by ``run``'s
    retraining stage, as ``--retrain-<flag>`` (``--lr`` → ``--retrain-lr``); rank, alpha, seed,
    batch size and ``--allow-dense-merge`` are then ``run``'s own.
    """

    # one of RETRAIN_METHODS: what is trained in every block
    method: str = flag("bias-ln", "--method", "What is trained in every block: biases, norms, both, or (Mask|Scale)LoRA "
                       "adapters (lora refills zeros: needs --allow-dense-merge).", choices=RETRAIN_METHODS, stage=True)
    steps: int = flag(20, "--steps", "Optimizer steps.", min=1)  # PERP: 20; run: --retrain-steps (JobConfig.retrain)
    # token windows per optimizer step (PERP: 1 × 2 accumulated)
    batch: int = flag(2, "--samples-per-step", "Token windows per optimizer step (their forwards/backwards go "
                      "--batch-size at a time, gradients accumulate).", min=1, stage=True)
    # windows per forward/backward slice; gradients accumulate over the step
    micro_batch: int = flag(1, "--batch-size", "Windows per forward/backward pass (gradients accumulate over the "
                            "step; memory grows with it).", min=1)
    # tokens per window, the BOS included when the tokenizer adds one; run's stage: --seq-len unless given
    seq_len: int = flag(256, "--seq-len", "Tokens per window (the BOS included when the tokenizer adds one).", min=2,
                        stage="--seq-len")
    lr: float = flag(5e-4, "--lr", "AdamW peak learning rate (PERP: 5e-4).", min=0.0, stage=True)  # PERP
    # share of the steps the learning rate rises linearly from 0 (PERP: 0.1)
    warmup: float = flag(0.1, "--warmup", "Share of the steps the learning rate rises linearly from 0, then decays "
                         "linearly to 0 (PERP: 0.1).")
    weight_decay: float = flag(0.0, "--weight-decay", "AdamW weight decay.", min=0.0)  # decoupled (PERP: 0)
    rank: int = RANK.field(16)  # rank of the (Mask|Scale)LoRA adapters
    alpha: float = ALPHA.field(32.0)  # adapter delta scaled by alpha / rank (scalelora ignores it)
    # seeds the data windows, their order, the held-out split and adapter inits
    seed: int = flag(0, "--seed", "Seed of the windows, their order, the held-out split and adapter inits.")
    # token windows drawn from --data (training and validation together)
    n_windows: int = flag(64, "--n-samples", "Token windows drawn from the training text (training and held out).",
                          min=1, stage=True)
    # share of the windows held out to judge the training; 0 = none
    val_fraction: float = flag(0.125, "--val", "Share of the windows held out, in [0, 1): the best evaluation is kept, "
                               "and the input is written unchanged if training does not beat it (0 = none: the last "
                               "step is kept).", stage=True)
    # optimizer steps between validation evaluations
    eval_every: int = flag(5, "--eval-every", "Held-out loss measured every this many steps.", min=1)
    allow_dense_merge: bool = ALLOW_DENSE_MERGE.field(False)  # lora only: accept that merging fills the pruned positions
    stream: str = flag("auto", "--stream", "Stream one block at a time (forward and backward): always, never, or auto "
                       "= when the weights do not fit the device.", choices=STREAM_MODES)

    # lm: next-token cross-entropy; kd: KL(teacher || student) on the teacher's top-k; lm+kd: their per-token sum
    loss: str = flag("lm", "--loss", "Training (and held-out) loss: lm = next-token cross-entropy; kd = KL(teacher "
                     "|| student) on the dense teacher's top-k next-token probabilities; lm+kd = the sum of the two "
                     "per-token means.", choices=LOSSES, stage=True)
    # softmax temperature of both distributions in the KL (the KL is scaled by T^2, as Hinton et al.)
    kd_temperature: float = flag(1.0, "--kd-temperature", "Distillation temperature T: teacher and student softmax at "
                                 "T, the KL scaled by T^2.", min=0.0, stage=True)
    # teacher probabilities kept per token (the rest of its mass is dropped from the KL and reported)
    kd_top_k: int = flag(64, "--kd-top-k", "Teacher next-token probabilities kept per token (the mass outside them "
                         "is reported as the truncation error).", min=1, stage=True)

    def __post_init__(self) -> None:
        checks = (
            (self.method in RETRAIN_METHODS, "method",
             f"must be one of {', '.join(RETRAIN_METHODS)}; got {self.method!r}"),
            (self.method != "lora" or self.allow_dense_merge, "method", DENSE_MERGE_PROBLEM),
            (self.steps >= 1, "steps", f"must be >= 1; got {self.steps}"),
            (self.batch >= 1, "batch", f"must be >= 1; got {self.batch}"),
            (self.micro_batch >= 1, "micro_batch", f"must be >= 1; got {self.micro_batch}"),
            (self.seq_len >= 2, "seq_len", f"must be >= 2; got {self.seq_len}"),
            (self.lr > 0, "lr", f"must be > 0; got {self.lr}"),
            (0 <= self.warmup < 1, "warmup", f"must be a fraction in [0, 1); got {self.warmup}"),
            (self.weight_decay >= 0, "weight_decay", f"must be >= 0; got {self.weight_decay}"),
            (self.rank >= 1, "rank", f"must be >= 1; got {self.rank}"),
            (self.alpha > 0, "alpha", f"must be > 0; got {self.alpha}"),
            (self.n_windows >= 1, "n_windows", f"must be >= 1; got {self.n_windows}"),
            (0 <= self.val_fraction < 1, "val_fraction", f"must be a fraction in [0, 1); got {self.val_fraction}"),
            (self.eval_every >= 1, "eval_every", f"must be >= 1; got {self.eval_every}"),
            (self.stream in STREAM_MODES, "stream", f"must be one of {', '.join(STREAM_MODES)}; got {self.stream!r}"),
            (self.loss in LOSSES, "loss", f"must be one of {', '.join(LOSSES)}; got {self.loss!r}"),
            (self.kd_temperature > 0, "kd_temperature", f"must be > 0; got {self.kd_temperature}"),
            (self.kd_top_k >= 1, "kd_top_k", f"must be >= 1; got {self.kd_top_k}"),
        )
        for ok, field, problem in checks:
            if not ok:
                raise FlagError(RetrainSpec, field, problem)

    @property
    def distils(self) -> bool:
        """Whether the loss has a distillation term (``kd`` or ``lm+kd``): a teacher is needed."""
        return self.loss != "lm"

    def fingerprint(self) -> dict:
        """The fields that decide the result (everything but how memory is used).

        The loss and its distillation settings appear only when the loss distils, so the fingerprints
        of ``lm`` jobs (every job made before ``--loss`` existed) stay as they were.
        """
        fields = dict(self.__dict__)
        fields.pop("stream")
        if not self.distils:
            for name in ("loss", *DISTILLATION_FIELDS):
                fields.pop(name)
        return fields
