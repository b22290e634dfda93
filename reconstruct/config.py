"""The job's settings as frozen dataclasses, built once by the CLI."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from pruners.allocation import OWL_LAMBDA, OWL_M, check_explicit_sparsities
from pruners.pattern import SparsityPattern
from calib.framing import BOS_MODES
from calib.text_sources import HUB_DATASETS


AUTO_METHOD = "masklora"  # what --method auto runs, at every sparsity and pattern


CHECKPOINT_AUTO = "auto"  # --checkpoint-every auto: the job picks the blocks between checkpoints


def parse_checkpoint_every(value: str | int) -> str | int:
    """``"auto"`` or a block count >= 1, from the ``--checkpoint-every`` text; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"--checkpoint-every must be 'auto' or a whole number of blocks >= 1, got {value!r}")
    text = str(value).strip().lower()
    if text == CHECKPOINT_AUTO:
        return CHECKPOINT_AUTO
    try:
        blocks = int(text)
    except ValueError:
        blocks = 0
    if blocks < 1 or str(blocks) != text:
        raise ValueError(f"--checkpoint-every must be 'auto' or a whole number of blocks >= 1, got {value!r}")
    return blocks


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
class CalibSpec:
    """Where calibration samples come from and how many."""

    source: str = "self"  # "self", a dataset name (wikitext2, c4, ptb) or a local .txt/.jsonl file
    n_samples: int = 128  # calibration sequences
    seq_len: int = 2048  # tokens per sequence
    seed: int = 0  # seeds window sampling, self-generation and reconstruction batches
    bos: str = "auto"  # how windows start: auto (a BOS when the tokenizer adds one), always, never

    def __post_init__(self) -> None:

        if self.bos not in BOS_MODES:
            raise ValueError(f"--calib-bos must be one of {', '.join(BOS_MODES)}; got {self.bos!r}")


VALIDATION_SEED_OFFSET = 1_000_003  # --recon-val-data windows are drawn with --seed + this (not the calibration's)


@dataclass(frozen=True)
class ValidationData:
    """``--recon-val-data``: windows of another text that judge each repair instead of held-out calibration.

    The windows have the calibration's length and framing (``--seq-len``, ``--calib-bos``) and travel
    through the block loop as extra rows of the activation streams, after the calibration rows;
    they never train and never feed the pruner's statistics.
    """

    source: str  # any --calib source: "self", a dataset name or a local .txt/.jsonl file
    n_samples: int  # windows drawn (--recon-val-samples; cli.py's default: max(1, --n-samples // 8))

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ValueError(f"--recon-val-samples must be >= 1; got {self.n_samples}")

    def seed(self, calib_seed: int) -> int:
        """The seed of the windows' offsets (or of ``self`` sampling): never the calibration windows' own."""
        return calib_seed + VALIDATION_SEED_OFFSET


ALLOCATIONS = ("uniform", "owl")  # --allocation: besides these, a .json file of per-block sparsities


@dataclass(frozen=True)
class AllocationSpec:
    """How the target sparsity is spread over the blocks (``--allocation``, ``--owl-m``, ``--owl-lambda``)."""

    kind: str = "uniform"  # "uniform", "owl" (pre-pass over the dense model) or "file" (explicit sparsities)
    owl_m: float = OWL_M  # OWL: a Wanda score is an outlier above M x its block's mean score
    owl_lambda: float = OWL_LAMBDA  # OWL: largest deviation of a block's sparsity from the target
    file: str | None = None  # "file": the JSON file's name, for messages
    sparsities: tuple[float, ...] | None = None  # "file": one sparsity per block, as read
    sha256: str | None = None  # "file": the file's content hash (the job fingerprint holds it)

    def __post_init__(self) -> None:
        if self.owl_m <= 0:
            raise ValueError(f"--owl-m must be > 0, got {self.owl_m}")
        if not 0.0 <= self.owl_lambda < 1.0:
            raise ValueError(f"--owl-lambda must be in [0, 1), got {self.owl_lambda}")

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
            raise ValueError(f"--allocation must be {', '.join(ALLOCATIONS)} or a .json file of per-block "
                             f"sparsities, got {value!r}")
        try:
            raw = path.read_bytes()
            data = json.loads(raw)
        except OSError as exc:
            raise ValueError(f"--allocation {value}: cannot read it ({exc.strerror})") from exc
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"--allocation {value}: not valid JSON ({str(exc).splitlines()[0]})") from exc
        if isinstance(data, dict):
            data = data.get("sparsities")
        if not isinstance(data, list) or not data:
            raise ValueError(f"--allocation {value}: expected a JSON list of per-block sparsities in [0, 1)")
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

    pruner: str = "wanda"  # magnitude, wanda, sparsegpt, loraprune
    pattern: SparsityPattern = field(default_factory=SparsityPattern)  # also heads / channels (structured)
    sequential: bool = False  # prune sub-layer groups one after another (q/k/v, o, up/gate, down)
    blocksize: int = 128  # SparseGPT column block
    percdamp: float = 0.01  # SparseGPT damping, fraction of the mean Hessian diagonal
    cycles: int = 1  # prune -> reconstruct cycles per block to reach the pattern (pruners.schedule)
    cycle_schedule: str = "cubic"  # how the sparsity grows over the cycles: cubic or linear
    loraprune_steps: int = 20  # LoRAPrune: LoRA warm-up steps per block (and per cycle)
    loraprune_rank: int = 8  # LoRAPrune: warm-up adapter rank (alpha = 2 * rank)
    loraprune_lr: float = 2e-2  # LoRAPrune: warm-up AdamW learning rate
    loraprune_objective: str = "block"  # LoRAPrune: "block" (per-block warm-up) or "model" (whole model, LM loss)
    heads_per_kv_group: bool = False  # --pattern heads with GQA: as many query heads from every kv group (--shrink)
    allocation: AllocationSpec = field(default_factory=AllocationSpec)  # per-block sparsities (uniform, OWL, file)

    @property
    def model_level_loraprune(self) -> bool:
        """True for ``--pruner loraprune --loraprune-objective model`` (the stage before block 0)."""
        return self.pruner == "loraprune" and self.loraprune_objective == "model"


@dataclass(frozen=True)
class EvalSpec:
    """Perplexity evaluation of the finished output (``run --eval``)."""

    data: str  # a local .txt/.jsonl test text or a dataset name (wikitext2, c4, ptb)
    seq_len: int | None = None  # tokens per window (None: min(2048, the model's context), resolved on load)
    max_windows: int | None = None  # evaluate only the first windows (None: all)

    def __post_init__(self) -> None:
        # Checked when the job is built, not hours later when the evaluation starts.

        path = Path(self.data).expanduser()
        if path.suffix in (".txt", ".jsonl") or path.exists():
            if not path.is_file():
                raise ValueError(f"--eval {self.data}: no such file")
        elif self.data not in HUB_DATASETS:
            raise ValueError(
                f"--eval {self.data!r} is not a file or a known dataset ({', '.join(HUB_DATASETS)})"
            )
        if self.seq_len is not None and self.seq_len < 2:
            raise ValueError(f"--max-length must be >= 2; got {self.seq_len}")
        if self.max_windows is not None and self.max_windows < 1:
            raise ValueError(f"--limit must be >= 1; got {self.max_windows}")


@dataclass(frozen=True)
class JobConfig:
    """Everything ``reconstruct run`` needs."""

    model: str  # folder, .gguf, hub id or alias
    out: Path  # output folder (also holds the resume state)
    prune: PruneSpec = field(default_factory=PruneSpec)
    calib: CalibSpec = field(default_factory=CalibSpec)
    recon: object | None = None  # reconstruct.methods.ReconSpec; None = no reconstruction
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    dtype: str = "auto"  # auto, float32, bfloat16, float16
    micro_batch: int = 8  # samples per block forward
    offload: str = "auto"  # activation cache tier: auto, device, cpu, disk
    checkpoint_every: str | int = "auto"  # stream checkpoints: "auto" (bounded cost) or every k blocks
    overlap: bool = True  # block reads/writes in the background (loop.overlap); not in the fingerprint: same bytes
    check_stream: bool = True  # compare the streamed forward with the model's own before block 1 (evaluation.parity)
    track_error: bool = False  # --method none: keep the dense stream anyway, to report each block's error
    force: bool = False  # start over even if --out holds another job
    evaluation: EvalSpec | None = None  # evaluate the output at the end; not part of the job's identity
    task_evaluation: object | None = None  # evaluation.tasks.TaskEvalSpec: --eval-tasks at the end; not in the identity either
    shrink: bool = False  # at the end, delete the removed heads/channels into OUT/shrunk (reconstruct.shrink)
    retrain: object | None = None  # reconstruct.retrain.RetrainSpec: model-level retraining after the loop; None = none
    retrain_data: str | None = None  # its training text (None: the --calib source)
    recon_val_data: ValidationData | None = None  # --recon-val-data: the guard's own text (None: held-out share)

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoint_every", parse_checkpoint_every(self.checkpoint_every))

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
