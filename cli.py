"""Command line: ``reconstruct run | retrain | plan | eval | sweep | inspect | status | shrink``. Parses, validates, builds a JobConfig; no logic."""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from reconstruct.host_allocator import unpool_large_allocations
from pruners.pattern import SparsityPattern
from reconstruct import __version__
from reconstruct.config import AllocationSpec, CalibSpec, EvalSpec, JobConfig, PruneSpec, ValidationData
from reconstruct.evaluation.perplexity import perplexity
from reconstruct.evaluation.tasks import TaskEvalSpec, evaluate_tasks, parse_task_names
from reconstruct.flag_aliases import rewrite_deprecated
from reconstruct.jobs.loraprune_stage import stage_spec
from reconstruct.jobs.retrain_job import RetrainJob, run_retrain
from reconstruct.jobs.run_job import run_job
from reconstruct.jobs.sweep import SweepSpec, checked_spec, run_sweep
from reconstruct.jobs.validation import check_validation_data
from reconstruct.methods import ReconSpec
from reconstruct.methods.spec import resolve_method
from reconstruct.modelio.loaded import load_model
from reconstruct.modelio.safetensors_header import DamagedFileError
from reconstruct.parallel import distributed
from reconstruct.planner import MemoryBudget, parse_bytes, plan_from_config
from reconstruct.progress import TqdmLoggingHandler
from reconstruct.reporting.inspect import format_table, inspect_folder
from reconstruct.reporting.status import describe_job, interrupted_summary
from reconstruct.retrain.memory import stage_plan
from reconstruct.retrain.spec import RetrainSpec
from reconstruct.shrink import SHRUNK_DIR, shrink_folder
from reconstruct.state.out_folder import check_out_folder

try:  # typer >= 0.29 carries its own copy of click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer on click
    from click.exceptions import NoArgsIsHelpError, UsageError

EXIT_BAD_INPUT = 2
EXIT_PLAN_DOES_NOT_FIT = 3  # `reconstruct plan`: the plan exceeds the memory budget
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT
DEFAULT_MODEL = "smollm2-135m"


class OneLineErrors(TyperGroup):
    """The app's command group: a usage error (unknown choice, missing value) is one ``error:`` line, exit 2."""

    def main(self, args=None, *rest, standalone_mode: bool = True, **kwargs):
        """Click's ``main``, with usage errors printed as one line instead of typer's box.

        Large host allocations are unpooled first, before any command allocates (``host_allocator``).
        Old flag names are rewritten to the new ones, one notice each (``reconstruct.flag_aliases``).
        """

        unpool_large_allocations()
        args, notices = rewrite_deprecated(sys.argv[1:] if args is None else args)
        for notice in notices:
            typer.echo(notice, err=True)
        try:
            code = super().main(args, *rest, standalone_mode=False, **kwargs)
        except NoArgsIsHelpError as error:  # no arguments at all: the help, as before
            error.show()
            code = error.exit_code
        except UsageError as error:
            command = error.ctx.command_path if error.ctx is not None else "reconstruct"
            message = error.format_message().replace("Value error, ", "")
            typer.echo(f"error: {message} (see {command} --help)", err=True)
            code = EXIT_BAD_INPUT
        except typer.Abort:
            typer.echo("Aborted.", err=True)
            code = 1
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: flag names are never cut, whatever the terminal width
    help="Prune an LLM block by block and repair it by layer-wise reconstruction. Converted models "
    "(the default smollm2-135m, .gguf files) are cached in $RECONSTRUCT_CACHE (default ~/.cache/reconstruct).",
    context_settings={"max_content_width": 100},
)
logger = logging.getLogger("reconstruct")


def _print_version(value: bool) -> None:
    if value:

        typer.echo(f"reconstruct {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """The options before the command: ``--version`` (the app's help text is ``app``'s)."""


class PrunerName(str, Enum):
    """How weights are scored (``--pruner``)."""

    magnitude = "magnitude"
    wanda = "wanda"
    sparsegpt = "sparsegpt"
    loraprune = "loraprune"


class LorapruneObjective(str, Enum):
    """What LoRAPrune's adapters are trained on (``--loraprune-objective``)."""

    block = "block"
    model = "model"


class CycleSchedule(str, Enum):
    """How the sparsity grows over ``--cycles``."""

    cubic = "cubic"
    linear = "linear"


class MethodName(str, Enum):
    """What reconstruction trains (``--method``)."""

    auto = "auto"
    none = "none"
    bias = "bias"
    ln = "ln"
    bias_ln = "bias-ln"
    masklora = "masklora"
    scalelora = "scalelora"
    lora = "lora"


class BosMode(str, Enum):
    """How token windows start (``--calib-bos``)."""

    auto = "auto"
    always = "always"
    never = "never"


BOS_HELP = ("How token windows start: auto = with the BOS exactly when the tokenizer adds one (as the model reads "
            "its inputs), always = with the tokenizer's BOS token, never = text only (the old behaviour).")


class Offload(str, Enum):
    """Where the activation cache lives (``--offload``)."""

    auto = "auto"
    device = "device"
    cpu = "cpu"
    disk = "disk"


class MaskScope(str, Enum):
    """Unstructured sparsity per output row or per layer (``--mask-scope``)."""

    row = "row"
    layer = "layer"


class Granularity(str, Enum):
    """What reconstruction matches (``--granularity``)."""

    block = "block"
    sublayer = "sublayer"
    linear = "linear"


class Target(str, Enum):
    """The reconstruction target (``--target``)."""

    dense = "dense"
    local = "local"


class ReconLoss(str, Enum):
    """What reconstruction minimises and the guard judges (``--recon-loss``; reconstruct.methods.loss)."""

    mse = "mse"
    token_relative = "token-relative"


class Dtype(str, Enum):
    """The compute dtype (``--dtype``)."""

    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"




def _setup_logging(verbose: bool) -> None:
    rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None  # under torchrun
    quiet = rank not in (None, "0") and not verbose  # ranks other than 0 log warnings only, unless -v

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s " + (f"[rank {rank}] " if rank else "") + "%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[TqdmLoggingHandler()],  # log lines above the progress bars, never glued onto one
    )
    for noisy in ("transformers", "accelerate", "datasets", "huggingface_hub", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_BAD_INPUT)


OS_ERROR_ADVICE = {  # errno -> what to do, for OS errors that are the user's to fix
    errno.ENOSPC: "free space or choose another --out",
    errno.EDQUOT: "free space or choose another --out",
    errno.EROFS: "a read-only disk: choose another --out",
    errno.EACCES: "no permission: choose a path you can write to, or fix its permissions",
    errno.ENOTDIR: "a file stands where a folder is needed: choose another path",
}


def _guarded(action, files_flag: str = "--model", out: Path | None = None):
    """Run ``action``; user errors become one line on stderr and exit code 2.

    User errors: ``ValueError``; a damaged model file (``DamagedFileError``, prefixed with
    ``files_flag``, or ``--out`` when the file lies in ``out``); a full, read-only or unwritable disk.
    """

    try:
        return action()
    except DamagedFileError as error:
        inside_out = out is not None and Path(out).resolve() in (error.path.resolve(), *error.path.resolve().parents)
        _fail(f"{'--out' if inside_out else files_flag} {error}")
    except ValueError as error:
        _fail(str(error))
    except OSError as error:
        if error.errno in OS_ERROR_ADVICE:
            _fail(f"{error.strerror}: {error.filename or ''} ({OS_ERROR_ADVICE[error.errno]})")
        raise


def command_flags(ctx: typer.Context, skip: tuple[str, ...] = ()) -> list[str]:
    """The options of the command ``ctx`` parsed, as flags that give the same values (``None`` left out).

    Used to start the same command again through torchrun (``--nproc``); ``skip`` names options to drop.
    """
    args: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.param_type_name != "option" or param.name in skip or value is None:
            continue
        if param.is_flag:
            if value != param.default:
                args.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            args += [param.opts[0], str(value.value if isinstance(value, Enum) else value)]
    return args


def _default_out(model: str, pruner: str, pattern: str, sparsity: float | None) -> Path:
    stem = Path(model).stem if model.endswith(".gguf") else Path(model.rstrip("/")).name
    shape = pattern.replace(":", "of") if pattern != "unstructured" else f"s{sparsity if sparsity is not None else 0.5:g}"
    if pattern in ("heads", "channels"):
        shape = f"{pattern}{sparsity if sparsity is not None else 0.5:g}"
    return Path(f"{stem}-{pruner}-{shape}")


# --------------------------------------------------------------------------- the flags of run
# Each flag of `run` is declared once here (type and help); `run`, `plan` and `sweep` list the ones
# they take, with the defaults of the option groups below.
Model = Annotated[str, typer.Option(help="Local HF folder, .gguf file, hub id or alias (opt-30b, smollm2-135m).")]
Pruner = Annotated[PrunerName, typer.Option(help="How weights are scored.")]
Sparsity = Annotated[Optional[float], typer.Option(help="Fraction of weights removed, in [0, 1) (heads/channels: of heads/channels removed per block); implied by N:M.", show_default="0.5")]
Pattern = Annotated[str, typer.Option(help="'unstructured', N:M (N kept of every M along the input, e.g. 2:4), 'heads' (whole attention heads) or 'channels' (MLP intermediate channels); heads/channels: --sparsity is the fraction of them removed per block, rounded to whole heads (0.2222 of 9 = 2).")]
Scope = Annotated[MaskScope, typer.Option(help="Unstructured: equal sparsity per output row or per layer.")]
Method = Annotated[MethodName, typer.Option(help="Reconstruction: auto = masklora (bias-ln, cheaper, made text unlike the calibration worse: docs/benchmarks.md).")]
ReconSteps = Annotated[Optional[int], typer.Option(min=0, help="Optimizer steps per block.", show_default="64")]
ReconEpochs = Annotated[Optional[float], typer.Option(help="Budget in passes over the training samples instead of --recon-steps: steps = ceil(E x training samples / --recon-samples-per-step).", show_default="off")]
ReconVal = Annotated[float, typer.Option(help="Share of the calibration samples held out to validate each repair, in [0, 1) (at least one sample; 0 = none, every sample trains).")]
ReconValData = Annotated[Optional[str], typer.Option(help="Validate each repair on windows of this text instead of held-out calibration samples (any --calib source; self = sampled from the dense model); every calibration sample then trains.", show_default="none: --recon-val's share")]
ReconValSamples = Annotated[Optional[int], typer.Option(min=1, help="--recon-val-data: windows drawn (of --seq-len tokens).", show_default="max(1, n_samples // 8)")]
ReconEvalEvery = Annotated[int, typer.Option(min=1, help="Guard: validation error measured every this many steps.")]
ReconPatience = Annotated[int, typer.Option(min=1, help="Guard: stop after this many evaluations without improvement.")]
ReconGuard = Annotated[bool, typer.Option(help="Keep the best validation step's parameters and undo a repair that is not better on the held-out samples than the pruned block (--no-recon-guard: train all steps, keep every repair; the error is still measured).")]
Lr = Annotated[Optional[float], typer.Option(min=0.0, help="AdamW peak learning rate (linear decay to 0).", show_default="5e-3")]
Rank = Annotated[int, typer.Option(min=1, help="LoRA rank (masklora, scalelora, lora).")]
Alpha = Annotated[float, typer.Option(min=0.0, help="LoRA alpha; the update is scaled by alpha/rank.")]
ReconSamplesPerStep = Annotated[Optional[int], typer.Option(min=1, help="Reconstruction: calibration samples per optimizer step (their forwards go --batch-size at a time).", show_default="2")]
WeightDecay = Annotated[Optional[float], typer.Option(min=0.0, help="AdamW weight decay.", show_default="0")]
GranularityFlag = Annotated[Granularity, typer.Option(help="What reconstruction matches: the whole block, each sublayer (attention and MLP separately) or each linear.")]
TargetFlag = Annotated[Target, typer.Option(help="Reconstruction target: dense = dense block on the dense stream (PERP), local = dense block on the pruned stream.")]
ReconLossFlag = Annotated[ReconLoss, typer.Option(help="What reconstruction minimises and the guard judges: mse over every element (PERP), or token-relative = each token's squared error over its target's squared norm, so a few massive-activation tokens do not outweigh the rest.")]
AllowDenseMerge = Annotated[bool, typer.Option(help="--method lora only: accept that merging refills pruned weights.")]
Calib = Annotated[str, typer.Option(help="Calibration text: 'self' (sampled from the model, no data needed), wikitext2, c4, ptb, or a .txt/.jsonl file.")]
NSamples = Annotated[int, typer.Option(min=1, help="Calibration sequences.")]
SeqLen = Annotated[int, typer.Option(min=2, help="Tokens per calibration sequence.")]
Seed = Annotated[int, typer.Option(help="Seed for calibration sampling and reconstruction.")]
CalibBos = Annotated[BosMode, typer.Option(help=BOS_HELP + " Also frames the --eval windows.")]
Sequential = Annotated[bool, typer.Option(help="Prune sub-layer groups in order (q/k/v, o, up/gate, down), re-collecting statistics between them.")]
Cycles = Annotated[int, typer.Option(min=1, help="Reach the pattern in this many prune -> reconstruct cycles per block (statistics re-collected each cycle; earlier zeros stay zero).")]
CycleScheduleFlag = Annotated[CycleSchedule, typer.Option(help="How the sparsity grows over --cycles: cubic (LoRAPrune's, front-loaded) or linear.")]
LorapruneSteps = Annotated[int, typer.Option(min=1, help="--pruner loraprune: LoRA warm-up steps per block (per cycle) that accumulate the importance.")]
LorapruneRank = Annotated[int, typer.Option(min=1, help="--pruner loraprune: rank of the warm-up adapters (alpha = 2 x rank).")]
LorapruneLr = Annotated[float, typer.Option(min=0.0, help="--pruner loraprune: AdamW learning rate of the warm-up.")]
LorapruneObjectiveFlag = Annotated[LorapruneObjective, typer.Option(help="--pruner loraprune: block (a LoRA warm-up per block on its reconstruction error) or model (LoRAPrune as its authors run it: LoRA on every block trained on the causal-LM loss over the calibration text for --loraprune-steps steps, pruning on the authors' cubic schedule; then the per-block loop repairs).")]
Allocation = Annotated[str, typer.Option(help="Sparsity per block: uniform (every block at --sparsity), owl (blocks with more activation outliers pruned less, mean weighted by size = --sparsity; one more pass over the dense model first), or FILE.json (a list of one sparsity per block, each in [0, 1)). Unstructured patterns only.")]
OwlM = Annotated[float, typer.Option(help="--allocation owl: a Wanda score is an outlier above M x its block's mean score.")]
OwlLambda = Annotated[float, typer.Option(help="--allocation owl: largest deviation of a block's sparsity from --sparsity, in [0, 1).")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
DtypeFlag = Annotated[Dtype, typer.Option(help="Compute dtype; auto = float32 on CPU, the checkpoint's dtype on GPU.")]
BatchSize = Annotated[int, typer.Option(min=1, help="Samples per forward pass (calibration, statistics, reconstruction, --eval; memory grows with it).")]
OffloadFlag = Annotated[Offload, typer.Option(help="Where the activation cache lives.")]
CheckpointEvery = Annotated[str, typer.Option(help="When to checkpoint (what a resume restarts from): the activation streams every k blocks, and the training stages (--retrain-steps, --loraprune-objective model) every k optimizer steps; or auto = as often as costs at most about 10% of the time (after every block or step while that is cheap).")]
Overlap = Annotated[bool, typer.Option(help="Read the next block and write the last one (shard, stream checkpoint, manifest) in the background while a block computes; --no-overlap runs them one after another (same output bytes).")]
CheckStream = Annotated[bool, typer.Option(help="Before block 1, run the streamed forward and the model's own forward on two short random windows and stop if they differ (one more read of every block); --no-check-stream skips it for a family you know streams exactly.")]
TrackError = Annotated[bool, typer.Option(help="--method none: also run the dense model alongside, to report each block's output error (one more block forward per block; reconstruction always does).")]
GpuMemory = Annotated[Optional[str], typer.Option(help="GPU memory the job may use, e.g. 24GiB or 80GB.", show_default="the GPU's free memory")]
HostMemory = Annotated[Optional[str], typer.Option(help="Host memory the job may use, e.g. 64GiB.", show_default="available memory")]
Out = Annotated[Optional[Path], typer.Option(help="Output folder; also holds the resume state.", show_default="MODEL-PRUNER-SHAPE in the current folder")]
Force = Annotated[bool, typer.Option(help="Start over even if --out holds a different or unfinished job.")]
EvalData = Annotated[Optional[str], typer.Option("--eval", help="At the end, perplexity of the output on this test text (.txt/.jsonl file or wikitext2, c4, ptb); recorded in reconstruct.json and report.md.", show_default="no evaluation")]
MaxLength = Annotated[Optional[int], typer.Option(min=2, help="--eval: tokens per perplexity window (windows do not overlap).", show_default="the smaller of 2048 and the model's context length")]
Limit = Annotated[Optional[int], typer.Option(min=1, help="--eval / --eval-tasks: score only the first N perplexity windows, and the first N items of each task.", show_default="all")]
EvalTasks = Annotated[Optional[str], typer.Option(help="At the end, these lm-evaluation-harness tasks on the output (comma-separated, e.g. piqa,arc_easy; log-likelihood tasks only; needs the eval extra: pip install -e \".[eval]\"); recorded in reconstruct.json and report.md.", show_default="no tasks")]
TaskData = Annotated[Optional[Path], typer.Option(help="--eval-tasks: local task data for offline use, DIR/<task>/ (as `reconstruct eval --task-data`).", show_default="none: lm-eval's data from the hub")]
Shrink = Annotated[bool, typer.Option("--shrink", help="--pattern heads/channels: at the end, also write OUT/shrunk, the smaller model with the removed heads/channels deleted (stock transformers loads it); heads with grouped-query attention are then removed equally from every key/value group.", show_default="off")]
Nproc = Annotated[int, typer.Option(min=1, help="Data-parallel processes on this machine (one GPU each on CUDA): relaunches through torchrun; see docs/distributed.md.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.", show_default="off")]


# --------------------------------------------------------------------------- the flags of retrain (and run's --retrain-*)
class RetrainMethodName(str, Enum):
    """What model-level retraining trains (``retrain --method``)."""

    bias = "bias"
    ln = "ln"
    bias_ln = "bias-ln"
    masklora = "masklora"
    scalelora = "scalelora"
    lora = "lora"


class StreamMode(str, Enum):
    """Whether retraining streams the blocks (``retrain --stream``)."""

    auto = "auto"
    always = "always"
    never = "never"


RetrainData = Annotated[str, typer.Option(help="Training text: a .txt/.jsonl file, wikitext2, c4, ptb, or 'self' (sampled from the model).")]
RetrainOut = Annotated[Path, typer.Option(help="Output folder; also holds the resume state.")]
RetrainMethod = Annotated[RetrainMethodName, typer.Option(help="What is trained in every block: biases, norms, both, or (Mask|Scale)LoRA adapters (lora refills zeros: needs --allow-dense-merge).")]
RetrainSteps = Annotated[int, typer.Option(min=1, help="Optimizer steps.")]
RetrainSamplesPerStep = Annotated[int, typer.Option(min=1, help="Token windows per optimizer step (their forwards/backwards go --batch-size at a time, gradients accumulate).")]
RetrainBatchSize = Annotated[int, typer.Option(min=1, help="Windows per forward/backward pass (gradients accumulate over the step; memory grows with it).")]
RetrainSeqLen = Annotated[int, typer.Option(min=2, help="Tokens per window (the BOS included when the tokenizer adds one).")]
RetrainLr = Annotated[float, typer.Option(min=0.0, help="AdamW peak learning rate (PERP: 5e-4).")]
RetrainWarmup = Annotated[float, typer.Option(help="Share of the steps the learning rate rises linearly from 0, then decays linearly to 0 (PERP: 0.1).")]
RetrainWeightDecay = Annotated[float, typer.Option(min=0.0, help="AdamW weight decay.")]
RetrainSeed = Annotated[int, typer.Option(help="Seed of the windows, their order, the held-out split and adapter inits.")]
RetrainNSamples = Annotated[int, typer.Option(min=1, help="Token windows drawn from --data (training and held out).")]
RetrainStageNSamples = Annotated[int, typer.Option(min=1, help="--retrain-steps: token windows drawn from --retrain-data (training and held out).")]
RetrainStageSamplesPerStep = Annotated[int, typer.Option(min=1, help="--retrain-steps: token windows per optimizer step (their forwards/backwards go --batch-size at a time).")]
RetrainVal = Annotated[float, typer.Option(help="Share of the windows held out, in [0, 1): the best evaluation is kept, and the input is written unchanged if training does not beat it (0 = none: the last step is kept).")]
RetrainEvalEvery = Annotated[int, typer.Option(min=1, help="Held-out loss measured every this many steps.")]
AllowDense = Annotated[bool, typer.Option(help="Retrain a --model whose block linears hold no zero (nothing looks pruned).")]
StreamFlag = Annotated[StreamMode, typer.Option(help="Stream one block at a time (forward and backward): always, never, or auto = when the weights do not fit the device.")]
RetrainCheckpointEvery = Annotated[str, typer.Option(help="Steps between training checkpoints (what a resume restarts from), or auto = every step while that costs at most 10% of a step's weight reads.")]

RetrainStageSteps = Annotated[int, typer.Option(min=0, help="After the layer-wise loop, retrain the whole model end to end for this many AdamW steps (PERP's global step; 0 = no retraining). The --retrain-* flags set it; rank, alpha, seed, --batch-size are shared.")]
RetrainStageData = Annotated[Optional[str], typer.Option(help="--retrain-steps: training text (any --calib source).", show_default="the --calib source")]
RetrainStageSeqLen = Annotated[Optional[int], typer.Option(min=2, help="--retrain-steps: tokens per window.", show_default="--seq-len")]

class OptionGroup:
    """A group of ``run``'s flags as a frozen dataclass whose fields are named as the parameters."""

    @classmethod
    def from_params(cls, params: Mapping[str, object]):
        """The group's fields picked from a command's parsed parameters (``typer.Context.params``)."""
        return cls(**{item.name: params[item.name] for item in fields(cls)})

    def flags(self) -> list[str]:
        """``--name value`` for every field that differs from its default (booleans as ``--x``/``--no-x``)."""
        args: list[str] = []
        for item in fields(self):
            value = getattr(self, item.name)
            if value is None or value == item.default:
                continue
            flag = item.metadata.get("flag", "--" + item.name.replace("_", "-"))
            if isinstance(value, bool):
                args.append(flag if value else "--no-" + item.name.replace("_", "-"))
            else:
                args += [flag, str(value.value if isinstance(value, Enum) else value)]
        return args


@dataclass(frozen=True)
class ShapeOptions(OptionGroup):
    """What to prune and how to repair it (the grid axes of ``sweep``)."""

    pruner: PrunerName = PrunerName.wanda
    sparsity: float | None = None  # None: 0.5, or implied by N:M
    pattern: str = "unstructured"
    method: MethodName = MethodName.auto


@dataclass(frozen=True)
class ReconOptions(OptionGroup):
    """Reconstruction: training budget, the held-out guard, adapters, objective."""

    recon_steps: int | None = None  # None: ReconSpec's default
    recon_epochs: float | None = None
    recon_val: float = 0.125
    recon_val_data: str | None = None  # None: the guard holds out --recon-val's share of the calibration
    recon_val_samples: int | None = None  # None: max(1, n_samples // 8)
    recon_eval_every: int = 8
    recon_patience: int = 3
    recon_guard: bool = True
    lr: float | None = None
    rank: int = 16
    alpha: float = 32.0
    recon_samples_per_step: int | None = None
    weight_decay: float | None = None
    granularity: Granularity = Granularity.block
    target: Target = Target.dense
    recon_loss: ReconLoss = ReconLoss.token_relative
    allow_dense_merge: bool = False
    track_error: bool = False


@dataclass(frozen=True)
class PruneOptions(OptionGroup):
    """How the pattern is reached: mask scope, sub-layer order, cycles, LoRAPrune's warm-up."""

    mask_scope: MaskScope = MaskScope.row
    sequential: bool = False
    cycles: int = 1
    cycle_schedule: CycleSchedule = CycleSchedule.cubic
    loraprune_steps: int = 20
    loraprune_rank: int = 8
    loraprune_lr: float = 2e-2
    loraprune_objective: LorapruneObjective = LorapruneObjective.block
    allocation: str = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08


@dataclass(frozen=True)
class CalibOptions(OptionGroup):
    """Calibration samples."""

    calib: str = "self"
    n_samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    calib_bos: BosMode = BosMode.auto


@dataclass(frozen=True)
class MachineOptions(OptionGroup):
    """The model and where it runs: device, dtype, batch, activation cache, checkpoints, memory budgets."""

    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: Dtype = Dtype.auto
    batch_size: int = 8
    offload: Offload = Offload.auto
    checkpoint_every: str = "auto"
    overlap: bool = True
    check_stream: bool = True
    gpu_memory: str | None = None
    host_memory: str | None = None


@dataclass(frozen=True)
class OutputOptions(OptionGroup):
    """``run`` alone: the output folder and the end-of-job evaluation."""

    out: Path | None = None  # None: MODEL-PRUNER-SHAPE
    force: bool = False
    eval_data: str | None = field(default=None, metadata={"flag": "--eval"})
    max_length: int | None = None
    limit: int | None = None  # perplexity windows and task items
    eval_tasks: str | None = None  # comma-separated lm-eval tasks on the output
    task_data: Path | None = None
    shrink: bool = False  # also write OUT/shrunk (reconstruct.shrink)


@dataclass(frozen=True)
class ProcessOptions(OptionGroup):
    """Processes and logging."""

    nproc: int = 1
    verbose: bool = False


@dataclass(frozen=True)
class RetrainStageOptions(OptionGroup):
    """``run`` alone: the model-level retraining stage after the layer-wise loop (``--retrain-*``)."""

    retrain_steps: int = 0  # 0: no stage
    retrain_data: str | None = None  # None: --calib
    retrain_method: RetrainMethodName = RetrainMethodName.bias_ln
    retrain_lr: float = 5e-4
    retrain_samples_per_step: int = 2
    retrain_seq_len: int | None = None  # None: --seq-len
    retrain_n_samples: int = 64
    retrain_val: float = 0.125


@dataclass(frozen=True)
class RunOptions:
    """Every flag of ``run``, by group; ``plan`` and ``sweep`` leave the groups they do not take at their defaults."""

    shape: ShapeOptions = field(default_factory=ShapeOptions)
    recon: ReconOptions = field(default_factory=ReconOptions)
    prune: PruneOptions = field(default_factory=PruneOptions)
    calib: CalibOptions = field(default_factory=CalibOptions)
    machine: MachineOptions = field(default_factory=MachineOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    process: ProcessOptions = field(default_factory=ProcessOptions)
    retrain: RetrainStageOptions = field(default_factory=RetrainStageOptions)

    @classmethod
    def from_params(cls, params: Mapping[str, object], groups: tuple[str, ...]) -> RunOptions:
        """The groups named in ``groups`` from a command's parsed parameters; the others at their defaults."""
        return cls(**{item.name: item.default_factory.from_params(params) for item in fields(cls) if item.name in groups})

    def shared_flags(self) -> list[str]:
        """The flags every cell of a sweep shares (all but the shape and the output folder)."""
        groups = (self.recon, self.prune, self.calib, self.machine, self.process)
        return [flag for group in groups for flag in group.flags()]

    def command_line(self) -> list[str]:
        """``run`` and its flags that differ from their defaults, ``--nproc`` left out (what torchrun starts)."""
        groups = (self.shape, self.recon, self.prune, self.calib, self.machine, self.output,
                  replace(self.process, nproc=ProcessOptions.nproc), self.retrain)
        return ["run", *(flag for group in groups for flag in group.flags())]


ALL_GROUPS = ("shape", "recon", "prune", "calib", "machine", "output", "process", "retrain")
PLAN_GROUPS = ("shape", "recon", "prune", "calib", "machine", "process", "retrain")  # not the output folder
SWEEP_GROUPS = ("recon", "prune", "calib", "machine", "process")  # the grid and the sweep folder are its own


@app.command()
def run(
    ctx: typer.Context,
    model: Model = MachineOptions.model,
    pruner: Pruner = ShapeOptions.pruner,
    sparsity: Sparsity = ShapeOptions.sparsity,
    pattern: Pattern = ShapeOptions.pattern,
    mask_scope: Scope = PruneOptions.mask_scope,
    method: Method = ShapeOptions.method,
    recon_steps: ReconSteps = ReconOptions.recon_steps,
    recon_epochs: ReconEpochs = ReconOptions.recon_epochs,
    recon_val: ReconVal = ReconOptions.recon_val,
    recon_val_data: ReconValData = ReconOptions.recon_val_data,
    recon_val_samples: ReconValSamples = ReconOptions.recon_val_samples,
    recon_eval_every: ReconEvalEvery = ReconOptions.recon_eval_every,
    recon_patience: ReconPatience = ReconOptions.recon_patience,
    recon_guard: ReconGuard = ReconOptions.recon_guard,
    lr: Lr = ReconOptions.lr,
    rank: Rank = ReconOptions.rank,
    alpha: Alpha = ReconOptions.alpha,
    recon_samples_per_step: ReconSamplesPerStep = ReconOptions.recon_samples_per_step,
    weight_decay: WeightDecay = ReconOptions.weight_decay,
    granularity: GranularityFlag = ReconOptions.granularity,
    target: TargetFlag = ReconOptions.target,
    recon_loss: ReconLossFlag = ReconOptions.recon_loss,
    allow_dense_merge: AllowDenseMerge = ReconOptions.allow_dense_merge,
    calib: Calib = CalibOptions.calib,
    n_samples: NSamples = CalibOptions.n_samples,
    seq_len: SeqLen = CalibOptions.seq_len,
    seed: Seed = CalibOptions.seed,
    calib_bos: CalibBos = CalibOptions.calib_bos,
    sequential: Sequential = PruneOptions.sequential,
    cycles: Cycles = PruneOptions.cycles,
    cycle_schedule: CycleScheduleFlag = PruneOptions.cycle_schedule,
    loraprune_steps: LorapruneSteps = PruneOptions.loraprune_steps,
    loraprune_rank: LorapruneRank = PruneOptions.loraprune_rank,
    loraprune_lr: LorapruneLr = PruneOptions.loraprune_lr,
    loraprune_objective: LorapruneObjectiveFlag = PruneOptions.loraprune_objective,
    allocation: Allocation = PruneOptions.allocation,
    owl_m: OwlM = PruneOptions.owl_m,
    owl_lambda: OwlLambda = PruneOptions.owl_lambda,
    device: Device = MachineOptions.device,
    dtype: DtypeFlag = MachineOptions.dtype,
    batch_size: BatchSize = MachineOptions.batch_size,
    offload: OffloadFlag = MachineOptions.offload,
    checkpoint_every: CheckpointEvery = MachineOptions.checkpoint_every,
    overlap: Overlap = MachineOptions.overlap,
    check_stream: CheckStream = MachineOptions.check_stream,
    track_error: TrackError = ReconOptions.track_error,
    gpu_memory: GpuMemory = MachineOptions.gpu_memory,
    host_memory: HostMemory = MachineOptions.host_memory,
    out: Out = OutputOptions.out,
    force: Force = OutputOptions.force,
    eval_data: EvalData = OutputOptions.eval_data,
    max_length: MaxLength = OutputOptions.max_length,
    limit: Limit = OutputOptions.limit,
    eval_tasks: EvalTasks = OutputOptions.eval_tasks,
    task_data: TaskData = OutputOptions.task_data,
    shrink: Shrink = OutputOptions.shrink,
    nproc: Nproc = ProcessOptions.nproc,
    verbose: Verbose = ProcessOptions.verbose,
    retrain_steps: RetrainStageSteps = RetrainStageOptions.retrain_steps,
    retrain_data: RetrainStageData = RetrainStageOptions.retrain_data,
    retrain_method: RetrainMethod = RetrainStageOptions.retrain_method,
    retrain_lr: RetrainLr = RetrainStageOptions.retrain_lr,
    retrain_samples_per_step: RetrainStageSamplesPerStep = RetrainStageOptions.retrain_samples_per_step,
    retrain_seq_len: RetrainStageSeqLen = RetrainStageOptions.retrain_seq_len,
    retrain_n_samples: RetrainStageNSamples = RetrainStageOptions.retrain_n_samples,
    retrain_val: RetrainVal = RetrainStageOptions.retrain_val,
) -> None:
    """Prune every linear layer of every block, reconstruct, and write a loadable model folder (+ report.md, report.png)."""
    options = RunOptions.from_params(ctx.params, ALL_GROUPS)
    _setup_logging(verbose)

    def build_and_run():

        job = build_job(options)
        check_out_folder(job.out)
        if nproc > 1 and not distributed.launched():  # under torchrun already: torchrun decides
            raise typer.Exit(distributed.relaunch(nproc, options.command_line()))
        try:
            report = run_job(job, _memory_budget(options.machine))
        except KeyboardInterrupt:
            _stop_interrupted(job.out)
        if not distributed.is_main():
            return  # rank 0 reports
        evaluated = report.get("evaluation")
        score = f", perplexity {evaluated['perplexity']:.3f}" if evaluated else ""
        summary = f"mean linear sparsity {report.get('mean_linear_sparsity', 0):.4f}{score}; see report.md"
        if report.get("already_finished"):
            typer.echo(f"{job.out} already holds this finished job; its model files were not rewritten ({summary})")
        else:
            typer.echo(f"wrote {job.out} ({summary})")
        if job.shrink:

            _echo_shrunk(job.out / SHRUNK_DIR, shrink_folder(job.out, job.out / SHRUNK_DIR))

    _guarded(build_and_run, out=options.output.out or _default_out(model, pruner.value, pattern, sparsity))


def _echo_shrunk(out: Path, summary: dict) -> None:
    """One line on a shrunk folder: parameters and weight bytes before and after."""
    params, size = summary["parameters"], summary["file_bytes"]
    typer.echo(f"wrote {out} (shrunk: {params['after']:,} parameters, was {params['before']:,}; "
               f"weight files {size['after'] / 2**20:.1f} MiB, was {size['before'] / 2**20:.1f} MiB)")


def _stop_interrupted(out: Path) -> None:
    """After Ctrl-C: one line on where the job stopped and how to resume it, then exit 130."""

    if distributed.is_main():
        typer.echo(f"\n{interrupted_summary(out)}", err=True)
    raise typer.Exit(EXIT_INTERRUPTED)


def build_job(options: RunOptions):
    """The JobConfig for the flags of ``run``."""

    shape, prune, calib, machine, output = options.shape, options.prune, options.calib, options.machine, options.output
    spec = SparsityPattern.parse(shape.pattern, shape.sparsity, prune.mask_scope.value)
    chosen = resolve_method(shape.method.value)
    if shape.method == MethodName.auto:
        logger.info("--method auto chose %s", chosen)
    job = JobConfig(
        model=machine.model,
        out=output.out or _default_out(machine.model, shape.pruner.value, shape.pattern, shape.sparsity),
        prune=PruneSpec(
            pruner=shape.pruner.value, pattern=spec, sequential=prune.sequential, cycles=prune.cycles,
            heads_per_kv_group=output.shrink and spec.kind == "heads",
            cycle_schedule=prune.cycle_schedule.value, loraprune_steps=prune.loraprune_steps,
            loraprune_rank=prune.loraprune_rank, loraprune_lr=prune.loraprune_lr,
            loraprune_objective=prune.loraprune_objective.value,
            allocation=AllocationSpec.parse(prune.allocation, prune.owl_m, prune.owl_lambda),
        ),
        calib=CalibSpec(source=calib.calib, n_samples=calib.n_samples, seq_len=calib.seq_len, seed=calib.seed,
                        bos=calib.calib_bos.value),
        recon=_recon_spec(options.recon, chosen),
        device=machine.device,
        dtype=machine.dtype.value,
        micro_batch=machine.batch_size,
        offload=machine.offload.value,
        checkpoint_every=machine.checkpoint_every,
        overlap=machine.overlap,
        check_stream=machine.check_stream,
        track_error=options.recon.track_error,
        force=output.force,
        evaluation=EvalSpec(output.eval_data, output.max_length, output.limit) if output.eval_data else None,
        task_evaluation=_task_evaluation(output.eval_tasks, output.task_data, output.limit, machine.batch_size),
        shrink=output.shrink,
        retrain=_retrain_stage_spec(options),
        retrain_data=options.retrain.retrain_data,
        recon_val_data=_validation_data(options.recon, calib.n_samples),
    )
    check_validation_data(job)
    return job


def _task_evaluation(tasks: str | None, task_data: Path | None, limit: int | None, batch_size: int | None = None):
    """The TaskEvalSpec of ``--eval-tasks`` / ``--task-data`` / ``--limit`` (None without ``--eval-tasks``)."""

    return TaskEvalSpec.from_flags(tasks, task_data, limit, batch_size)


def _validation_data(recon: ReconOptions, n_samples: int):
    """The ValidationData of ``--recon-val-data`` / ``--recon-val-samples`` (None without ``--recon-val-data``)."""

    if recon.recon_val_data is None:
        if recon.recon_val_samples is not None:
            raise ValueError("--recon-val-samples counts --recon-val-data's windows: give --recon-val-data too")
        return None
    if recon.recon_val not in (0.0, ReconOptions.recon_val):
        raise ValueError("--recon-val-data replaces the held-out share: drop --recon-val (every calibration "
                         "sample trains)")
    return ValidationData(recon.recon_val_data, recon.recon_val_samples or max(1, n_samples // 8))


def _retrain_stage_spec(options: RunOptions):
    """The RetrainSpec of ``run --retrain-*`` (None without ``--retrain-steps``); rank, alpha, seed shared."""
    stage = options.retrain
    if stage.retrain_steps == 0:
        return None

    try:
        return RetrainSpec(
            method=stage.retrain_method.value, steps=stage.retrain_steps, batch=stage.retrain_samples_per_step,
            micro_batch=options.machine.batch_size, seq_len=stage.retrain_seq_len or options.calib.seq_len,
            lr=stage.retrain_lr, rank=options.recon.rank, alpha=options.recon.alpha, seed=options.calib.seed,
            n_windows=stage.retrain_n_samples, val_fraction=stage.retrain_val,
            allow_dense_merge=options.recon.allow_dense_merge,
        )
    except ValueError as error:  # RetrainSpec names reconstruct retrain's flags: name run's own
        flag, _, rest = str(error).partition(" ")
        if flag == "--seq-len" and stage.retrain_seq_len is None:
            raise
        raise ValueError(f"{RUN_RETRAIN_FLAGS.get(flag, flag)} {rest}") from None


RUN_RETRAIN_FLAGS = {"--method": "--retrain-method", "--steps": "--retrain-steps",
                     "--samples-per-step": "--retrain-samples-per-step", "--seq-len": "--retrain-seq-len",
                     "--lr": "--retrain-lr", "--n-samples": "--retrain-n-samples",
                     "--val": "--retrain-val"}  # RetrainSpec's flag -> run's (the others are shared or fixed)


def _recon_spec(recon: ReconOptions, method: str):
    """The ReconSpec of the reconstruction flags, for ``method`` (``--method auto`` already resolved)."""

    if recon.recon_steps is not None and recon.recon_epochs is not None:
        raise ValueError("give --recon-steps or --recon-epochs, not both")
    overrides = dict(steps=recon.recon_steps, lr=recon.lr, batch_size=recon.recon_samples_per_step,
                     weight_decay=recon.weight_decay)
    return ReconSpec(
        method=method, rank=recon.rank, alpha=recon.alpha, allow_dense_merge=recon.allow_dense_merge,
        granularity=recon.granularity.value, target=recon.target.value, loss=recon.recon_loss.value,
        **{k: v for k, v in overrides.items() if v is not None},
        epochs=recon.recon_epochs, eval_every=recon.recon_eval_every,
        val_fraction=0.0 if recon.recon_val_data is not None else recon.recon_val,  # the text validates instead
        patience=recon.recon_patience, guard=recon.recon_guard,
    )


def _memory_budget(machine: MachineOptions):

    gpu, host = machine.gpu_memory, machine.host_memory
    return MemoryBudget(
        device_bytes=parse_bytes(gpu, "--gpu-memory") if gpu is not None else None,
        host_bytes=parse_bytes(host, "--host-memory") if host is not None else None,
    )


@app.command("plan")
def plan(
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Option(help="Plan from this config.json alone (no weights needed).", show_default="--model's config")] = None,
    model: Model = MachineOptions.model,
    pruner: Pruner = ShapeOptions.pruner,
    sparsity: Sparsity = ShapeOptions.sparsity,
    pattern: Pattern = ShapeOptions.pattern,
    mask_scope: Scope = PruneOptions.mask_scope,
    method: Method = ShapeOptions.method,
    recon_steps: ReconSteps = ReconOptions.recon_steps,
    recon_epochs: ReconEpochs = ReconOptions.recon_epochs,
    recon_val: ReconVal = ReconOptions.recon_val,
    recon_val_data: ReconValData = ReconOptions.recon_val_data,
    recon_val_samples: ReconValSamples = ReconOptions.recon_val_samples,
    recon_eval_every: ReconEvalEvery = ReconOptions.recon_eval_every,
    recon_patience: ReconPatience = ReconOptions.recon_patience,
    recon_guard: ReconGuard = ReconOptions.recon_guard,
    lr: Lr = ReconOptions.lr,
    rank: Rank = ReconOptions.rank,
    alpha: Alpha = ReconOptions.alpha,
    recon_samples_per_step: ReconSamplesPerStep = ReconOptions.recon_samples_per_step,
    weight_decay: WeightDecay = ReconOptions.weight_decay,
    granularity: GranularityFlag = ReconOptions.granularity,
    target: TargetFlag = ReconOptions.target,
    recon_loss: ReconLossFlag = ReconOptions.recon_loss,
    allow_dense_merge: AllowDenseMerge = ReconOptions.allow_dense_merge,
    calib: Calib = CalibOptions.calib,
    n_samples: NSamples = CalibOptions.n_samples,
    seq_len: SeqLen = CalibOptions.seq_len,
    seed: Seed = CalibOptions.seed,
    calib_bos: CalibBos = CalibOptions.calib_bos,
    sequential: Sequential = PruneOptions.sequential,
    cycles: Cycles = PruneOptions.cycles,
    cycle_schedule: CycleScheduleFlag = PruneOptions.cycle_schedule,
    loraprune_steps: LorapruneSteps = PruneOptions.loraprune_steps,
    loraprune_rank: LorapruneRank = PruneOptions.loraprune_rank,
    loraprune_lr: LorapruneLr = PruneOptions.loraprune_lr,
    loraprune_objective: LorapruneObjectiveFlag = PruneOptions.loraprune_objective,
    allocation: Allocation = PruneOptions.allocation,
    owl_m: OwlM = PruneOptions.owl_m,
    owl_lambda: OwlLambda = PruneOptions.owl_lambda,
    device: Device = MachineOptions.device,
    dtype: DtypeFlag = MachineOptions.dtype,
    batch_size: BatchSize = MachineOptions.batch_size,
    offload: OffloadFlag = MachineOptions.offload,
    checkpoint_every: CheckpointEvery = MachineOptions.checkpoint_every,
    overlap: Overlap = MachineOptions.overlap,
    check_stream: CheckStream = MachineOptions.check_stream,
    track_error: TrackError = ReconOptions.track_error,
    gpu_memory: GpuMemory = MachineOptions.gpu_memory,
    host_memory: HostMemory = MachineOptions.host_memory,
    nproc: Nproc = ProcessOptions.nproc,
    verbose: Verbose = ProcessOptions.verbose,
    retrain_steps: RetrainStageSteps = RetrainStageOptions.retrain_steps,
    retrain_data: RetrainStageData = RetrainStageOptions.retrain_data,
    retrain_method: RetrainMethod = RetrainStageOptions.retrain_method,
    retrain_lr: RetrainLr = RetrainStageOptions.retrain_lr,
    retrain_samples_per_step: RetrainStageSamplesPerStep = RetrainStageOptions.retrain_samples_per_step,
    retrain_seq_len: RetrainStageSeqLen = RetrainStageOptions.retrain_seq_len,
    retrain_n_samples: RetrainStageNSamples = RetrainStageOptions.retrain_n_samples,
    retrain_val: RetrainVal = RetrainStageOptions.retrain_val,
) -> None:
    """Print the memory plan of `run` with the same flags (block, streams, working set, peaks), doing no work.

    With --retrain-steps (and with --loraprune-objective model), also that training stage's memory on
    both paths (resident, streamed) and the one it would take (needs --model: the sizes come from its
    checkpoint).

    --device auto plans for a GPU when this machine has one or --gpu-memory is given, else for the CPU.
    Exit code 0 when the plan fits its budgets, 3 when it does not, 2 on bad input.
    """
    options = RunOptions.from_params(ctx.params, PLAN_GROUPS)
    _setup_logging(verbose)

    def show():

        job = build_job(options)
        memory_plan = plan_from_config(job, config, _memory_budget(options.machine))
        typer.echo(memory_plan.format())
        fits = memory_plan.fits
        for text, stage_fits in _stage_plans(job, config):
            typer.echo(text)
            fits = fits and stage_fits
        if not fits:
            raise typer.Exit(EXIT_PLAN_DOES_NOT_FIT)

    _guarded(show)


def _stage_plans(job, config: Path | None) -> list[tuple[str, bool]]:
    """The training stages' plans (``retrain.memory.stage_plan``) and whether each fits.

    Model-level LoRAPrune (before the block loop) and ``--retrain-steps`` (after it) run on the same
    trainer; their sizes come from the model's checkpoint, so ``--config`` alone cannot plan them.
    """
    stages = []
    if job.prune.model_level_loraprune:

        stages.append(("LoRAPrune stage (--loraprune-objective model)", stage_spec(job)))
    if job.retrain is not None:
        stages.append(("retraining stage", job.retrain))
    if not stages:
        return []
    if config is not None:
        return [(f"{title}: not planned from --config alone (its sizes come from the checkpoint; give --model)", True)
                for title, _ in stages]

    loaded = load_model(job.model, job.device, job.dtype)
    return [stage_plan(spec, loaded, title) for title, spec in stages]


TASKS_HELP = ("Zero-shot tasks, comma-separated: any task, group or tag of lm-evaluation-harness (piqa, arc_easy, "
              "hellaswag, ...), run on the model in memory or streamed (--stream); needs the eval extra "
              '(pip install -e ".[eval]"). Log-likelihood tasks only: generative (generate_until) tasks are refused.')
TASK_DATA_HELP = ("Local task data for offline use: DIR/<task>/ holds a task's files (train/validation/test .jsonl "
                  "in the task's dataset schema; PIQA's valid.jsonl + valid-labels.lst) or a custom lm-eval task YAML.")


@app.command("eval")
def evaluate(
    model: Annotated[str, typer.Option(help="Model folder, .gguf, alias or hub id.")] = DEFAULT_MODEL,
    data: Annotated[Optional[str], typer.Option(help="Perplexity test text: a .txt/.jsonl file or wikitext2, c4, ptb.", show_default="wikitext2 when no --tasks")] = None,
    tasks: Annotated[Optional[str], typer.Option(help=TASKS_HELP, show_default="none")] = None,
    task_data: Annotated[Optional[Path], typer.Option(help=TASK_DATA_HELP, show_default="none: lm-eval's data from the hub")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Score only the first N perplexity windows, and the first N questions of each of --tasks.", show_default="all")] = None,
    max_length: Annotated[Optional[int], typer.Option(min=2, help="Tokens per perplexity window (windows do not overlap).", show_default="the smaller of 2048 and the model's context length")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Samples per forward pass: perplexity windows or task sequences (memory grows with it).")] = 1,
    calib_bos: Annotated[BosMode, typer.Option(help=BOS_HELP + " Perplexity windows: BOS + T-1 text tokens; tasks: BOS before each context.")] = BosMode.auto,
    stream: Annotated[Optional[bool], typer.Option("--stream/--no-stream", help="Run the model one block at a time.", show_default="only when it does not fit in memory")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: DtypeFlag = Dtype.auto,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.", show_default="off")] = False,
) -> None:
    """Perplexity on non-overlapping windows of a test text, and zero-shot task accuracy (prints JSON)."""
    _setup_logging(verbose)

    def evaluate_model():

        task_names = parse_task_names(tasks)
        common = dict(device=device, dtype=dtype.value, batch_size=batch_size, stream=stream, bos=calib_bos.value)
        result: dict = {}
        if data is not None or not task_names:
            result = perplexity(model, data or "wikitext2", seq_len=max_length, max_windows=limit, **common)
        if task_names:
            result["tasks"] = evaluate_tasks(model, task_names, task_data, limit, **common)
        typer.echo(json.dumps(result))

    _guarded(evaluate_model)


@app.command()
def status(out: Annotated[Path, typer.Argument(help="A job's output folder.")]) -> None:
    """Blocks done / total, elapsed and estimated time left, and the job's settings."""

    def show():

        typer.echo(describe_job(out))

    _guarded(show)


@app.command("sweep")
def sweep(
    ctx: typer.Context,
    eval_data: Annotated[str, typer.Option("--eval", help="Perplexity test text for every cell (.txt/.jsonl file or wikitext2, c4, ptb).")],
    out: Annotated[Path, typer.Option(help="Sweep folder: cells go to OUT/<cell>, results to OUT/sweep.{md,csv,png}.")],
    pruner: Annotated[str, typer.Option(help="Pruners, comma-separated: " + ", ".join(member.value for member in PrunerName) + ".")] = "wanda",
    sparsity: Annotated[str, typer.Option(help="Sparsities for the unstructured pattern, comma-separated, e.g. 0.5,0.6,0.7.")] = "0.5",
    pattern: Annotated[str, typer.Option(help="Patterns, comma-separated: unstructured and/or N:M such as 2:4 (N:M implies its sparsity).")] = "unstructured",
    method: Annotated[str, typer.Option(help="Reconstruction methods, comma-separated, e.g. none,bias-ln,masklora.")] = "none,bias-ln,masklora",
    max_length: MaxLength = None,
    limit: Limit = None,
    eval_tasks: EvalTasks = None,
    task_data: TaskData = None,
    model: Model = MachineOptions.model,
    mask_scope: Scope = PruneOptions.mask_scope,
    recon_steps: ReconSteps = ReconOptions.recon_steps,
    recon_epochs: ReconEpochs = ReconOptions.recon_epochs,
    recon_val: ReconVal = ReconOptions.recon_val,
    recon_val_data: ReconValData = ReconOptions.recon_val_data,
    recon_val_samples: ReconValSamples = ReconOptions.recon_val_samples,
    recon_eval_every: ReconEvalEvery = ReconOptions.recon_eval_every,
    recon_patience: ReconPatience = ReconOptions.recon_patience,
    recon_guard: ReconGuard = ReconOptions.recon_guard,
    lr: Lr = ReconOptions.lr,
    rank: Rank = ReconOptions.rank,
    alpha: Alpha = ReconOptions.alpha,
    recon_samples_per_step: ReconSamplesPerStep = ReconOptions.recon_samples_per_step,
    weight_decay: WeightDecay = ReconOptions.weight_decay,
    granularity: GranularityFlag = ReconOptions.granularity,
    target: TargetFlag = ReconOptions.target,
    recon_loss: ReconLossFlag = ReconOptions.recon_loss,
    allow_dense_merge: AllowDenseMerge = ReconOptions.allow_dense_merge,
    calib: Calib = CalibOptions.calib,
    n_samples: NSamples = CalibOptions.n_samples,
    seq_len: SeqLen = CalibOptions.seq_len,
    seed: Seed = CalibOptions.seed,
    calib_bos: CalibBos = CalibOptions.calib_bos,
    sequential: Sequential = PruneOptions.sequential,
    cycles: Cycles = PruneOptions.cycles,
    cycle_schedule: CycleScheduleFlag = PruneOptions.cycle_schedule,
    loraprune_steps: LorapruneSteps = PruneOptions.loraprune_steps,
    loraprune_rank: LorapruneRank = PruneOptions.loraprune_rank,
    loraprune_lr: LorapruneLr = PruneOptions.loraprune_lr,
    loraprune_objective: LorapruneObjectiveFlag = PruneOptions.loraprune_objective,
    allocation: Allocation = PruneOptions.allocation,
    owl_m: OwlM = PruneOptions.owl_m,
    owl_lambda: OwlLambda = PruneOptions.owl_lambda,
    device: Device = MachineOptions.device,
    dtype: DtypeFlag = MachineOptions.dtype,
    batch_size: BatchSize = MachineOptions.batch_size,
    offload: OffloadFlag = MachineOptions.offload,
    checkpoint_every: CheckpointEvery = MachineOptions.checkpoint_every,
    overlap: Overlap = MachineOptions.overlap,
    check_stream: CheckStream = MachineOptions.check_stream,
    track_error: TrackError = ReconOptions.track_error,
    gpu_memory: GpuMemory = MachineOptions.gpu_memory,
    host_memory: HostMemory = MachineOptions.host_memory,
    nproc: Nproc = ProcessOptions.nproc,
    verbose: Verbose = ProcessOptions.verbose,
) -> None:
    """Run a grid of pruner × pattern × sparsity × method (each cell a resumable job), evaluate each, and tabulate."""
    options = RunOptions.from_params(ctx.params, SWEEP_GROUPS)
    _setup_logging(verbose)

    def run_grid():

        check_out_folder(out)

        def values(text: str) -> tuple[str, ...]:
            return tuple(part.strip() for part in text.split(",") if part.strip())

        try:
            sparsities = tuple(float(value) for value in values(sparsity))
        except ValueError:
            raise ValueError(f"--sparsity must be comma-separated numbers such as 0.5,0.6; got {sparsity!r}") from None
        spec = SweepSpec(
            out=out, pruners=values(pruner), patterns=values(pattern), sparsities=sparsities, methods=values(method),
            evaluation=EvalSpec(eval_data, max_length, limit), run_flags=tuple(options.shared_flags()),
            task_evaluation=_task_evaluation(eval_tasks, task_data, limit),
        )
        spec = checked_spec(spec, mask_scope.value, model, seq_len)
        rows = run_sweep(spec, mask_scope.value)
        typer.echo(f"wrote {out / 'sweep.md'}, sweep.csv and sweep.png ({len(rows) - 1} cells and the dense model)")

    _guarded(run_grid, out=out)


@app.command("shrink")
def shrink_model_folder(
    folder: Annotated[Path, typer.Argument(help="A model folder whose heads or MLP channels are zeroed (a reconstruct run output, or any folder: all-zero groups are found).")],
    out: Annotated[Path, typer.Option(help="The new, smaller model folder (an interrupted shrink there resumes).")],
    verbose: Verbose = False,
) -> None:
    """Delete removed heads/channels: smaller matrices and config that stock transformers loads, same function."""
    _setup_logging(verbose)

    def write():

        check_out_folder(out)
        _echo_shrunk(out, shrink_folder(folder, out))

    _guarded(write, files_flag="FOLDER", out=out)


@app.command("inspect")
def inspect_model_folder(
    folder: Annotated[Path, typer.Argument(help="A Hugging Face model folder (pruned or dense).")],
    nm: Annotated[Optional[str], typer.Option(help="Check N:M compliance, e.g. 2:4: at most N non-zeros in every M weights along the input.", show_default="no check")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.", show_default="off")] = False,
    layers: Annotated[bool, typer.Option("--layers", help="One row per layer, not only per block.", show_default="off")] = False,
) -> None:
    """Sparsity per block of a model folder (per layer with --layers), read tensor by tensor; N:M compliance with --nm."""

    def show():

        result = inspect_folder(folder, nm)
        typer.echo(json.dumps(result, indent=2) if as_json else format_table(result, per_layer=layers))

    _guarded(show, files_flag="FOLDER")


@app.command("retrain")
def retrain(
    ctx: typer.Context,
    data: RetrainData,
    out: RetrainOut,
    model: Model = DEFAULT_MODEL,
    method: RetrainMethod = RetrainMethodName.bias_ln,
    steps: RetrainSteps = 20,
    samples_per_step: RetrainSamplesPerStep = 2,
    batch_size: RetrainBatchSize = 1,
    seq_len: RetrainSeqLen = 256,
    lr: RetrainLr = 5e-4,
    warmup: RetrainWarmup = 0.1,
    weight_decay: RetrainWeightDecay = 0.0,
    rank: Rank = 16,
    alpha: Alpha = 32.0,
    seed: RetrainSeed = 0,
    n_samples: RetrainNSamples = 64,
    val: RetrainVal = 0.125,
    eval_every: RetrainEvalEvery = 5,
    allow_dense: AllowDense = False,
    allow_dense_merge: AllowDenseMerge = False,
    stream: StreamFlag = StreamMode.auto,
    calib_bos: CalibBos = BosMode.auto,
    device: Device = "auto",
    dtype: DtypeFlag = Dtype.auto,
    checkpoint_every: RetrainCheckpointEvery = "auto",
    check_stream: CheckStream = True,
    eval_data: EvalData = None,
    max_length: MaxLength = None,
    limit: Limit = None,
    eval_tasks: EvalTasks = None,
    task_data: TaskData = None,
    nproc: Nproc = ProcessOptions.nproc,
    verbose: Verbose = False,
) -> None:
    """Retrain the whole pruned model end to end (PERP's global step), keeping every zero; streamed when it does not fit."""
    _setup_logging(verbose)

    def build_and_run():

        check_out_folder(out)
        spec = RetrainSpec(
            method=method.value, steps=steps, batch=samples_per_step, micro_batch=batch_size, seq_len=seq_len,
            lr=lr, warmup=warmup, weight_decay=weight_decay, rank=rank, alpha=alpha, seed=seed, n_windows=n_samples,
            val_fraction=val, eval_every=eval_every, allow_dense_merge=allow_dense_merge, stream=stream.value,
        )
        evaluation = EvalSpec(eval_data, max_length, limit) if eval_data is not None else None
        job = RetrainJob(model=model, data=data, out=out, spec=spec, device=device, dtype=dtype.value,
                         bos=calib_bos.value, allow_dense=allow_dense, checkpoint_every=checkpoint_every,
                         evaluation=evaluation, check_stream=check_stream,
                         task_evaluation=_task_evaluation(eval_tasks, task_data, limit))
        if nproc > 1 and not distributed.launched():  # under torchrun already: torchrun decides
            raise typer.Exit(distributed.relaunch(nproc, ["retrain", *command_flags(ctx, skip=("nproc",))]))
        try:
            report = run_retrain(job)
        except KeyboardInterrupt:
            typer.echo(f"\ninterrupted; the same command continues from the last checkpoint in {out}", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        if "retrain" not in report:
            return  # not the main rank
        result = report["retrain"]
        evaluated = report.get("evaluation")
        score = (f", perplexity {evaluated['perplexity_before']:.3f} → {evaluated['perplexity_after']:.3f}"
                 if evaluated else "")
        kept = "" if result["kept"] else "; training did not beat the untrained model on held-out text, input kept"
        prefix = f"{out} already holds this finished job" if report.get("already_finished") else f"wrote {out}"
        typer.echo(f"{prefix} ({result['steps']} steps, final loss {result['loss_curve'][-1]:.4f}{score}{kept}; "
                   "see report.md)")

    _guarded(build_and_run, out=out)


if __name__ == "__main__":
    app()
