"""The job's settings as frozen dataclasses, built once by the CLI.

Each field a flag sets declares that flag (name, help, choices) beside its default
(``reconstruct.flags``); the command line derives its options from them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from pruners.allocation import OWL_LAMBDA, OWL_M, check_explicit_sparsities
from pruners.pattern import SparsityPattern
from pruners.registry import PRUNER_NAMES
from pruners.schedule import SCHEDULES
from calib.activations import TIERS
from calib.framing import BOS_MODES
from calib.stdlib_code import STDLIB_CODE
from calib.text_sources import HUB_DATASETS, SELF
from reconstruct.flags import REQUIRED, Flag, FlagError, flag
from reconstruct.runtime import COMPUTE_DTYPES

DEFAULT_MODEL = "smollm2-135m"  # --model when not given: the built-in SmolLM2-135M-Instruct

# Flags that several specs share (run and retrain take the same --model, --device, ...).
MODEL = Flag("--model", "Local HF folder, .gguf file, hub id or alias (opt-30b, smollm2-135m).",
             cli_default=DEFAULT_MODEL)
DEVICE = Flag("--device", "auto, cpu, cuda or cuda:N.")
DTYPE = Flag("--dtype", "Compute dtype; auto = float32 on CPU, the checkpoint's dtype on GPU.",
             choices=("auto", *COMPUTE_DTYPES))
BOS = Flag("--calib-bos", "How token windows start (calibration, self sampling, perplexity windows, task contexts): "
           "auto = with the BOS exactly when the tokenizer adds one (as the model reads its inputs), always = with "
           "the tokenizer's BOS token, never = text only (the old behaviour).", choices=BOS_MODES)
CHECK_STREAM = Flag("--check-stream", "Before block 1, run the streamed forward and the model's own forward on two "
                    "short random windows and stop if they differ (one more read of every block); --no-check-stream "
                    "skips it for a family you know streams exactly.")
LIMIT = Flag("--limit", "Score only the first N perplexity windows, and the first N items of each task.", min=1,
             show_default="all")

CHECKPOINT_AUTO = "auto"  # --checkpoint-every auto: the job picks the blocks between checkpoints


def parse_checkpoint_every(value: str | int) -> str | int:
    """``"auto"`` or a block count >= 1, from the ``--checkpoint-every`` text; ValueError otherwise."""
    problem = f"must be 'auto' or a whole number of blocks >= 1, got {value!r}"
    if isinstance(value, bool):
        raise FlagError(JobConfig, "checkpoint_every", problem)
    text = str(value).strip().lower()
    if text == CHECKPOINT_AUTO:
        return CHECKPOINT_AUTO
    try:
        blocks = int(text)
    except ValueError:
        blocks = 0
    if blocks < 1 or str(blocks) != text:
        raise FlagError(JobConfig, "checkpoint_every", problem)
    return blocks


@dataclass(frozen=True)
class CalibSpec:
    """Where calibration samples come from and how many."""

    # "self", a dataset name (wikitext2, c4, ptb) or a local .txt/.jsonl file
    source: str = flag("self", "--calib", "Calibration text: 'self' (sampled from the model, no data needed), "
                       "wikitext2, c4, ptb, or a .txt/.jsonl file.")
    n_samples: int = flag(128, "--n-samples", "Calibration sequences.", min=1)
    seq_len: int = flag(2048, "--seq-len", "Tokens per calibration sequence.", min=2)
    # seeds window sampling, self-generation and reconstruction batches
    seed: int = flag(0, "--seed", "Seed for calibration sampling and reconstruction.")
    bos: str = BOS.field("auto")  # how windows start: auto (a BOS when the tokenizer adds one), always, never

    def __post_init__(self) -> None:

        if self.bos not in BOS_MODES:
            raise FlagError(CalibSpec, "bos", f"must be one of {', '.join(BOS_MODES)}; got {self.bos!r}")


VALIDATION_SEED_OFFSET = 1_000_003  # --recon-val-data windows are drawn with --seed + this (not the calibration's)
MODEL_CHECK_SEED_OFFSET = 2_000_003  # --model-check windows: --seed + this
MODEL_CHECK_AUTO = "auto"  # --model-check's default: self for a text --calib, python-stdlib for --calib self
MODEL_CHECK_OFF = "off"


@dataclass(frozen=True)
class ValidationData:
    """``--recon-val-data``: windows of another text that judge each repair instead of held-out calibration.

    The windows have the calibration's length and framing (``--seq-len``, ``--calib-bos``) and travel
    through the block loop as extra rows of the activation streams, after the calibration rows;
    they never train and never feed the pruner's statistics.
    """

    # any --calib source: "self", a dataset name or a local .txt/.jsonl file
    source: str = flag(REQUIRED, "--recon-val-data", "Validate each repair on windows of this text instead of "
                       "held-out calibration samples (any --calib source; self = sampled from the dense model); every "
                       "calibration sample then trains.", unset=True, show_default="none: --recon-val's share")
    n_samples: int = flag(REQUIRED, "--recon-val-samples", "--recon-val-data: windows drawn (of --seq-len tokens).",
                          min=1, unset=True, show_default="max(1, n_samples // 8)")  # see default_samples

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise FlagError(ValidationData, "n_samples", f"must be >= 1; got {self.n_samples}")

    @staticmethod
    def default_samples(calib_samples: int) -> int:
        """The windows drawn when ``--recon-val-samples`` is not given: an eighth of the calibration's."""
        return max(1, calib_samples // 8)

    def seed(self, calib_seed: int) -> int:
        """The seed of the windows' offsets (or of ``self`` sampling): never the calibration windows' own."""
        return calib_seed + VALIDATION_SEED_OFFSET


ALLOCATIONS = ("uniform", "owl")  # --allocation: besides these, a .json file of per-block sparsities


@dataclass(frozen=True)
class AllocationSpec:
    """How the target sparsity is spread over the blocks (``--allocation``, ``--owl-m``, ``--owl-lambda``)."""

    # "uniform", "owl" (pre-pass over the dense model) or "file" (explicit sparsities; the flag names the file)
    kind: str = flag("uniform", "--allocation", "Sparsity per block: uniform (every block at --sparsity), owl (blocks "
                     "with more activation outliers pruned less, mean weighted by size = --sparsity; one more pass over "
                     "the dense model first), or FILE.json (a list of one sparsity per block, each in [0, 1)). "
                     "Unstructured patterns only.")
    # OWL: a Wanda score is an outlier above M x its block's mean score
    owl_m: float = flag(OWL_M, "--owl-m", "--allocation owl: a Wanda score is an outlier above M x its block's mean "
                        "score.")
    # OWL: largest deviation of a block's sparsity from the target
    owl_lambda: float = flag(OWL_LAMBDA, "--owl-lambda", "--allocation owl: largest deviation of a block's sparsity "
                             "from --sparsity, in [0, 1).")
    file: str | None = None  # "file": the JSON file's name, for messages
    sparsities: tuple[float, ...] | None = None  # "file": one sparsity per block, as read
    sha256: str | None = None  # "file": the file's content hash (the job fingerprint holds it)

    def __post_init__(self) -> None:
        if self.owl_m <= 0:
            raise FlagError(AllocationSpec, "owl_m", f"must be > 0, got {self.owl_m}")
        if not 0.0 <= self.owl_lambda < 1.0:
            raise FlagError(AllocationSpec, "owl_lambda", f"must be in [0, 1), got {self.owl_lambda}")

    @property
    def uniform(self) -> bool:
        """True when every block gets the target sparsity (the default)."""
        return self.kind == "uniform"

    @classmethod
    def parse(cls, value: str, owl_m: float = OWL_M, owl_lambda: float = OWL_LAMBDA) -> AllocationSpec:
        """The spec of ``--allocation uniform|owl|FILE.json``; a file is read and checked here.

        The file holds a JSON list of sparsities, one per block in [0, 1) (``{"sparsities": [...]}``
        also works); the count is checked against the model later (``validation.validate_job``).

        Raises:
            ValueError: one line naming ``--allocation`` and what is allowed.
        """
        if value in ALLOCATIONS:
            return cls(kind=value, owl_m=owl_m, owl_lambda=owl_lambda)
        path = Path(value).expanduser()
        if path.suffix != ".json":
            raise FlagError(cls, "kind", f"must be {', '.join(ALLOCATIONS)} or a .json file of per-block "
                                         f"sparsities, got {value!r}")
        try:
            raw = path.read_bytes()
            data = json.loads(raw)
        except OSError as exc:
            raise FlagError(cls, "kind", f"{value}: cannot read it ({exc.strerror})") from exc
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FlagError(cls, "kind", f"{value}: not valid JSON ({str(exc).splitlines()[0]})") from exc
        if isinstance(data, dict):
            data = data.get("sparsities")
        if not isinstance(data, list) or not data:
            raise FlagError(cls, "kind", f"{value}: expected a JSON list of per-block sparsities in [0, 1)")
        values = check_explicit_sparsities(data, len(data), path.name)  # each in [0, 1); the count: later
        return cls(kind="file", owl_m=owl_m, owl_lambda=owl_lambda, file=path.name, sparsities=tuple(values),
                   sha256=hashlib.sha256(raw).hexdigest())

    def fingerprint(self) -> dict:
        """What of the allocation determines the output (the content hash of a file, not its name)."""
        if self.kind == "owl":
            return {"kind": "owl", "owl_m": self.owl_m, "owl_lambda": self.owl_lambda}
        if self.kind == "file":
            return {"kind": "file", "sha256": self.sha256}
        return {"kind": self.kind}


LORAPRUNE_OBJECTIVES = ("block", "model")  # --loraprune-objective


@dataclass(frozen=True)
class PruneSpec:
    """Which pruner, which pattern, and its options."""

    pruner: str = flag("wanda", "--pruner", "How weights are scored.", choices=PRUNER_NAMES)
    # --pattern, --sparsity, --mask-scope: the pattern's own fields declare them (SparsityPattern.parse)
    pattern: SparsityPattern = field(default_factory=SparsityPattern)  # also heads / channels (structured)
    # prune sub-layer groups one after another (q/k/v, o, up/gate, down)
    sequential: bool = flag(False, "--sequential", "Prune sub-layer groups in order (q/k/v, o, up/gate, down), "
                            "re-collecting statistics between them.")
    blocksize: int = 128  # SparseGPT column block
    # SparseGPT damping, fraction of the mean Hessian diagonal
    percdamp: float = flag(0.01, "--percdamp", "--pruner sparsegpt: damping added to the Hessian's diagonal, as a "
                           "fraction of its mean (raise it when a layer's Hessian is not positive definite); > 0.")
    # prune -> reconstruct cycles per block to reach the pattern (pruners.schedule)
    cycles: int = flag(1, "--cycles", "Reach the pattern in this many prune -> reconstruct cycles per block "
                       "(statistics re-collected each cycle; earlier zeros stay zero).", min=1)
    cycle_schedule: str = flag("cubic", "--cycle-schedule", "How the sparsity grows over --cycles: cubic (LoRAPrune's, "
                               "front-loaded) or linear.", choices=SCHEDULES)
    loraprune_steps: int = flag(20, "--loraprune-steps", "--pruner loraprune: LoRA warm-up steps per block (per "
                                "cycle) that accumulate the importance.", min=1)
    loraprune_rank: int = flag(8, "--loraprune-rank", "--pruner loraprune: rank of the warm-up adapters (alpha = 2 x "
                               "rank).", min=1)
    loraprune_lr: float = flag(2e-2, "--loraprune-lr", "--pruner loraprune: AdamW learning rate of the warm-up.",
                               min=0.0)
    # "block" (per-block warm-up) or "model" (whole model, LM loss)
    loraprune_objective: str = flag(
        "block", "--loraprune-objective", "--pruner loraprune: block (a LoRA warm-up per block on its reconstruction "
        "error) or model (LoRAPrune as its authors run it: LoRA on every block trained on the causal-LM loss over the "
        "calibration text for --loraprune-steps steps, pruning on the authors' cubic schedule; then the per-block "
        "loop repairs).", choices=LORAPRUNE_OBJECTIVES)
    # mixture of experts: an expert that saw fewer calibration tokens is pruned by magnitude (modelio.experts)
    min_expert_tokens: int = flag(32, "--min-expert-tokens", "Mixture-of-experts models: an expert whose linears "
                                  "received fewer calibration tokens than this from the router is pruned by weight "
                                  "magnitude instead of --pruner's statistics (counted in the report).", min=0)
    heads_per_kv_group: bool = False  # --pattern heads with GQA: as many query heads from every kv group (--shrink)
    allocation: AllocationSpec = field(default_factory=AllocationSpec)  # per-block sparsities (uniform, OWL, file)

    def __post_init__(self) -> None:
        if not self.percdamp > 0:
            raise FlagError(PruneSpec, "percdamp", f"must be > 0; got {self.percdamp}")

    @property
    def model_level_loraprune(self) -> bool:
        """True for ``--pruner loraprune --loraprune-objective model`` (the stage before block 0)."""
        return self.pruner == "loraprune" and self.loraprune_objective == "model"


@dataclass(frozen=True)
class EvalSpec:
    """Perplexity evaluation of the finished output (``run --eval``)."""

    # a local .txt/.jsonl test text or a dataset name (wikitext2, c4, ptb)
    data: str = flag(REQUIRED, "--eval", "At the end, perplexity of the output on this test text (.txt/.jsonl file or "
                     "wikitext2, c4, ptb); recorded in reconstruct.json and report.md.", unset=True,
                     show_default="no evaluation")
    # tokens per window (None: min(2048, the model's context), resolved on load)
    seq_len: int | None = flag(None, "--max-length", "Tokens per perplexity window (windows do not overlap).", min=2,
                               show_default="the smaller of 2048 and the model's context length")
    max_windows: int | None = LIMIT.field(None)  # evaluate only the first windows (None: all)

    def __post_init__(self) -> None:
        # Checked when the job is built, not hours later when the evaluation starts.

        path = Path(self.data).expanduser()
        if path.suffix in (".txt", ".jsonl") or path.exists():
            if not path.is_file():
                raise FlagError(EvalSpec, "data", f"{self.data}: no such file")
        elif self.data not in HUB_DATASETS:
            raise FlagError(EvalSpec, "data", f"{self.data!r} is not a file or a known dataset "
                                              f"({', '.join(HUB_DATASETS)})")
        if self.seq_len is not None and self.seq_len < 2:
            raise FlagError(EvalSpec, "seq_len", f"must be >= 2; got {self.seq_len}")
        if self.max_windows is not None and self.max_windows < 1:
            raise FlagError(EvalSpec, "max_windows", f"must be >= 1; got {self.max_windows}")


@dataclass(frozen=True)
class JobConfig:
    """Everything ``reconstruct run`` needs."""

    model: str = MODEL.field()  # folder, .gguf, hub id or alias
    # output folder (also holds the resume state); the command line derives one from the settings
    out: Path = flag(REQUIRED, "--out", "Output folder; also holds the resume state.", unset=True,
                     show_default="MODEL-PRUNER-SHAPE in the current folder")
    prune: PruneSpec = field(default_factory=PruneSpec)
    calib: CalibSpec = field(default_factory=CalibSpec)
    recon: object | None = None  # reconstruct.methods.ReconSpec; None = no reconstruction
    device: str = DEVICE.field("auto")  # auto, cpu, cuda, cuda:1, ...
    dtype: str = DTYPE.field("auto")  # auto, float32, bfloat16, float16
    # samples per block forward
    micro_batch: int = flag(8, "--batch-size", "Samples per forward pass (calibration, statistics, reconstruction, "
                            "--eval; memory grows with it).", min=1)
    # activation cache tier: auto, device, cpu, disk
    offload: str = flag("auto", "--offload", "Where the activation cache lives.", choices=("auto", *TIERS))
    # stream checkpoints: "auto" (bounded cost) or every k blocks
    checkpoint_every: str | int = flag(
        CHECKPOINT_AUTO, "--checkpoint-every", "When to checkpoint (what a resume restarts from): the activation "
        "streams every k blocks, and the training stages (--retrain-steps, --loraprune-objective model) every k "
        "optimizer steps; or auto = as often as costs at most about 10% of the time (after every block or step while "
        "that is cheap).")
    # block reads/writes in the background (loop.overlap); not in the fingerprint: same bytes
    overlap: bool = flag(True, "--overlap", "Read the next block and write the last one (shard, stream checkpoint, "
                         "manifest) in the background while a block computes; --no-overlap runs them one after "
                         "another (same output bytes).")
    check_stream: bool = CHECK_STREAM.field(True)  # compare the streamed forward with the model's own before block 1
    # --method none: keep the dense stream anyway, to report each block's error
    track_error: bool = flag(False, "--track-error", "--method none: also run the dense model alongside, to report "
                             "each block's output error (one more block forward per block; reconstruction always "
                             "does).")
    force: bool = flag(False, "--force", "Start over even if --out holds a different or unfinished job.")
    evaluation: EvalSpec | None = None  # evaluate the output at the end; not part of the job's identity
    task_evaluation: object | None = None  # evaluation.tasks.TaskEvalSpec: --eval-tasks at the end; not in the identity either
    # at the end, delete the removed heads/channels into OUT/shrunk (reconstruct.shrink)
    shrink: bool = flag(False, "--shrink", "--pattern heads/channels: at the end, also write OUT/shrunk, the smaller "
                        "model with the removed heads/channels deleted (stock transformers loads it); heads with "
                        "grouped-query attention are then removed equally from every key/value group.",
                        negatable=False, show_default="off")
    # reconstruct.retrain.RetrainSpec: model-level retraining after the loop; None = none (--retrain-steps 0)
    retrain: object | None = flag(None, "--retrain-steps", "After the layer-wise loop, retrain the whole model end to "
                                  "end for this many AdamW steps (PERP's global step; 0 = no retraining). The "
                                  "--retrain-* flags set it; rank, alpha, seed, --batch-size are shared.", min=0,
                                  cli_type=int, cli_default=0)
    # its training text (None: the --calib source)
    retrain_data: str | None = flag(None, "--retrain-data", "--retrain-steps: training text (any --calib source).",
                                    show_default="the --calib source")
    recon_val_data: ValidationData | None = None  # --recon-val-data: the guard's own text (None: held-out share)
    # after the loop: keep the repairs only if the whole model is better with them (jobs/model_check_stage.py)
    model_check: str = flag(
        MODEL_CHECK_AUTO, "--model-check", "After the loop, compare the repaired model with the same pruned model "
        "without its repairs by next-token loss on windows of this text, and keep the better (a revert writes the "
        f"pruned weights before repair back). auto = windows sampled from the dense model ({SELF}) when --calib is a "
        f"text, Python standard-library source ({STDLIB_CODE}) when --calib {SELF}; or any --calib source, "
        f"{STDLIB_CODE}, or {MODEL_CHECK_OFF}.")
    model_check_samples: int = flag(8, "--model-check-samples", "--model-check: windows drawn (of --seq-len tokens).",
                                    min=1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoint_every", parse_checkpoint_every(self.checkpoint_every))
        if self.model_check_samples < 1:
            raise FlagError(JobConfig, "model_check_samples", f"must be >= 1; got {self.model_check_samples}")

    @property
    def model_check_text(self) -> str | None:
        """The judge text of ``--model-check`` (``auto`` resolved); None when no check runs.

        No check without a repair to judge (``--method none``) or with ``--model-check off``.
        """
        if self.recon is None or getattr(self.recon, "method", "none") == "none" or self.model_check == MODEL_CHECK_OFF:
            return None
        if self.model_check == MODEL_CHECK_AUTO:
            return STDLIB_CODE if self.calib.source == SELF else SELF
        return self.model_check

    @property
    def needs_dense_stream(self) -> bool:
        """True when the job carries the dense model's activations alongside the pruned ones.

        Reconstruction trains toward them, LoRAPrune's block training scores against them, and
        ``--track-error`` reports each block's output error against them. A plain prune (``--method
        none`` with magnitude, Wanda or SparseGPT) needs only the pruned stream: one block forward
        fewer per block and half the activation memory.
        """
        reconstructing = self.recon is not None and getattr(self.recon, "method", "none") != "none"
        block_scoring = self.prune.pruner == "loraprune" and not self.prune.model_level_loraprune
        return reconstructing or block_scoring or self.track_error

    @property
    def needs_allocation_pass(self) -> bool:
        """True when a pre-pass over the dense model sets the blocks' sparsities (``--allocation owl``)."""
        return self.prune.allocation.kind == "owl"

    @property
    def n_streams(self) -> int:
        """Activation streams the job carries: pruned, plus dense when :attr:`needs_dense_stream`.

        ``--allocation owl`` also carries two: its pre-pass runs the dense model on a copy of block 0's
        inputs (in the dense stream when the job has one, else in a second stream kept for the pre-pass).
        """
        return 2 if self.needs_dense_stream or self.needs_allocation_pass else 1
