"""Command line: ``reconstruct run | plan | eval | sweep | inspect | status | shrink``. Parses, validates, builds a JobConfig; no logic."""

from __future__ import annotations

import errno
import inspect
import json
import logging
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

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

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        """Click's ``main``, with usage errors printed as one line instead of typer's box."""
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
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


class PrunerName(str, Enum):
    magnitude = "magnitude"
    wanda = "wanda"
    sparsegpt = "sparsegpt"
    loraprune = "loraprune"


class CycleSchedule(str, Enum):
    cubic = "cubic"
    linear = "linear"


class MethodName(str, Enum):
    auto = "auto"
    none = "none"
    bias = "bias"
    ln = "ln"
    bias_ln = "bias-ln"
    masklora = "masklora"
    scalelora = "scalelora"
    lora = "lora"


class BosMode(str, Enum):
    auto = "auto"
    always = "always"
    never = "never"


BOS_HELP = ("How token windows start: auto = with the BOS exactly when the tokenizer adds one (as the model reads "
            "its inputs), always = with the tokenizer's BOS token, never = text only (the old behaviour).")


class Offload(str, Enum):
    auto = "auto"
    device = "device"
    cpu = "cpu"
    disk = "disk"


class MaskScope(str, Enum):
    row = "row"
    layer = "layer"


class Granularity(str, Enum):
    block = "block"
    sublayer = "sublayer"
    linear = "linear"


class Target(str, Enum):
    dense = "dense"
    local = "local"


class Dtype(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


MASKLORA_FROM_SPARSITY = 0.6  # --method auto: bias-ln below this sparsity, masklora at or above
EVAL_FLAGS = ("eval_data", "eval_seq_len", "eval_windows")  # run's end-of-job evaluation: not for plan or sweep cells


def _setup_logging(verbose: bool) -> None:
    rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None  # under torchrun
    quiet = rank not in (None, "0") and not verbose  # ranks other than 0 log warnings only, unless -v
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s " + (f"[rank {rank}] " if rank else "") + "%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("transformers", "accelerate", "datasets", "huggingface_hub", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def _guarded(action):
    """Run ``action``; user errors (ValueError, full disk) become one line on stderr and exit code 2."""
    try:
        return action()
    except ValueError as error:
        _fail(str(error))
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            _fail(f"{error.strerror}: {error.filename or ''} (free space or choose another --out)")
        raise


def _default_out(model: str, pruner: str, pattern: str, sparsity: float | None) -> Path:
    stem = Path(model).stem if model.endswith(".gguf") else Path(model.rstrip("/")).name
    shape = pattern.replace(":", "of") if pattern != "unstructured" else f"s{sparsity if sparsity is not None else 0.5:g}"
    if pattern in ("heads", "channels"):
        shape = f"{pattern}{sparsity if sparsity is not None else 0.5:g}"
    return Path(f"{stem}-{pruner}-{shape}")


@app.command()
def run(
    model: Annotated[str, typer.Option(help="Local HF folder, .gguf file, hub id or alias (opt-30b, smollm2-135m).")] = DEFAULT_MODEL,
    pruner: Annotated[PrunerName, typer.Option(help="How weights are scored.")] = PrunerName.wanda,
    sparsity: Annotated[Optional[float], typer.Option(help="Fraction of weights removed, in [0, 1) (heads/channels: of heads/channels removed per block); implied by N:M.", show_default="0.5")] = None,
    pattern: Annotated[str, typer.Option(help="'unstructured', N:M (N kept of every M along the input, e.g. 2:4), 'heads' (whole attention heads) or 'channels' (MLP intermediate channels); heads/channels: --sparsity is the fraction of them removed per block, rounded to whole heads (0.2222 of 9 = 2).")] = "unstructured",
    mask_scope: Annotated[MaskScope, typer.Option(help="Unstructured: equal sparsity per output row or per layer.")] = MaskScope.row,
    method: Annotated[MethodName, typer.Option(help="Reconstruction: auto = bias-ln below 60% sparsity, masklora at or above.")] = MethodName.auto,
    recon_steps: Annotated[Optional[int], typer.Option(min=0, help="Optimizer steps per block.", show_default="64")] = None,
    recon_epochs: Annotated[Optional[float], typer.Option(help="Budget in passes over the training samples instead of --recon-steps: steps = ceil(E x training samples / --recon-batch).", show_default="off")] = None,
    recon_val: Annotated[float, typer.Option(help="Share of the calibration samples held out to validate each repair, in [0, 1) (at least one sample; 0 = none, every sample trains).")] = 0.125,
    recon_eval_every: Annotated[int, typer.Option(min=1, help="Guard: validation error measured every this many steps.")] = 8,
    recon_patience: Annotated[int, typer.Option(min=1, help="Guard: stop after this many evaluations without improvement.")] = 3,
    recon_guard: Annotated[bool, typer.Option(help="Keep the best validation step's parameters and undo a repair that is not better on the held-out samples than the pruned block (--no-recon-guard: train all steps, keep every repair; the error is still measured).")] = True,
    lr: Annotated[Optional[float], typer.Option(min=0.0, help="AdamW peak learning rate (linear decay to 0).", show_default="5e-3")] = None,
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank (masklora, scalelora, lora).")] = 16,
    alpha: Annotated[float, typer.Option(min=0.0, help="LoRA alpha; the update is scaled by alpha/rank.")] = 32.0,
    recon_batch: Annotated[Optional[int], typer.Option(min=1, help="Calibration samples per optimizer step.", show_default="2")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(min=0.0, help="AdamW weight decay.", show_default="0")] = None,
    granularity: Annotated[Granularity, typer.Option(help="What reconstruction matches: the whole block, each sublayer (attention and MLP separately) or each linear.")] = Granularity.block,
    target: Annotated[Target, typer.Option(help="Reconstruction target: dense = dense block on the dense stream (PERP), local = dense block on the pruned stream.")] = Target.dense,
    allow_dense_merge: Annotated[bool, typer.Option(help="--method lora only: accept that merging refills pruned weights.")] = False,
    calib: Annotated[str, typer.Option(help="Calibration text: 'self' (sampled from the model, no data needed), wikitext2, c4, ptb, or a .txt/.jsonl file.")] = "self",
    n_samples: Annotated[int, typer.Option(min=1, help="Calibration sequences.")] = 128,
    seq_len: Annotated[int, typer.Option(min=2, help="Tokens per calibration sequence.")] = 2048,
    seed: Annotated[int, typer.Option(help="Seed for calibration sampling and reconstruction.")] = 0,
    calib_bos: Annotated[BosMode, typer.Option(help=BOS_HELP + " Also frames the --eval windows.")] = BosMode.auto,
    sequential: Annotated[bool, typer.Option(help="Prune sub-layer groups in order (q/k/v, o, up/gate, down), re-collecting statistics between them.")] = False,
    cycles: Annotated[int, typer.Option(min=1, help="Reach the pattern in this many prune -> reconstruct cycles per block (statistics re-collected each cycle; earlier zeros stay zero).")] = 1,
    cycle_schedule: Annotated[CycleSchedule, typer.Option(help="How the sparsity grows over --cycles: cubic (LoRAPrune's, front-loaded) or linear.")] = CycleSchedule.cubic,
    loraprune_steps: Annotated[int, typer.Option(min=1, help="--pruner loraprune: LoRA warm-up steps per block (per cycle) that accumulate the importance.")] = 20,
    loraprune_rank: Annotated[int, typer.Option(min=1, help="--pruner loraprune: rank of the warm-up adapters (alpha = 2 x rank).")] = 8,
    loraprune_lr: Annotated[float, typer.Option(min=0.0, help="--pruner loraprune: AdamW learning rate of the warm-up.")] = 2e-2,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[Dtype, typer.Option(help="Compute dtype; auto = float32 on CPU, the checkpoint's dtype on GPU.")] = Dtype.auto,
    micro_batch: Annotated[int, typer.Option(min=1, help="Samples per block forward.")] = 8,
    offload: Annotated[Offload, typer.Option(help="Where the activation cache lives.")] = Offload.auto,
    checkpoint_every: Annotated[str, typer.Option(help="When to checkpoint the activation streams (what a resume restarts from): every k blocks, or auto = after every block while that is cheap, else so that checkpoints cost at most 10% of the block time.")] = "auto",
    track_error: Annotated[bool, typer.Option(help="--method none: also run the dense model alongside, to report each block's output error (one more block forward per block; reconstruction always does).")] = False,
    gpu_memory: Annotated[Optional[str], typer.Option(help="GPU memory the job may use, e.g. 24GiB or 80GB.", show_default="the GPU's free memory")] = None,
    host_memory: Annotated[Optional[str], typer.Option(help="Host memory the job may use, e.g. 64GiB.", show_default="available memory")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder; also holds the resume state.", show_default="MODEL-PRUNER-SHAPE in the current folder")] = None,
    force: Annotated[bool, typer.Option(help="Start over even if --out holds a different or unfinished job.")] = False,
    eval_data: Annotated[Optional[str], typer.Option("--eval", help="At the end, perplexity of the output on this test text (.txt/.jsonl file or wikitext2, c4, ptb); recorded in reconstruct.json and report.md.", show_default="no evaluation")] = None,
    eval_seq_len: Annotated[Optional[int], typer.Option(min=2, help="--eval: tokens per window.", show_default="the smaller of 2048 and the model's context length")] = None,
    eval_windows: Annotated[Optional[int], typer.Option(min=1, help="--eval: only the first N windows.", show_default="all")] = None,
    nproc: Annotated[int, typer.Option(min=1, help="Data-parallel processes on this machine (one GPU each on CUDA): relaunches through torchrun; see docs/distributed.md.")] = 1,
    shrink: Annotated[bool, typer.Option("--shrink", help="--pattern heads/channels: at the end, also write OUT/shrunk, the smaller model with the removed heads/channels deleted (stock transformers loads it); heads with grouped-query attention are then removed equally from every key/value group.", show_default="off")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.", show_default="off")] = False,
) -> None:
    """Prune every linear layer of every block, reconstruct, and write a loadable model folder (+ report.md, report.png)."""
    options = dict(locals())  # every flag by name: build_job and the memory budget read them
    _setup_logging(verbose)

    def build_and_run():
        from reconstruct.parallel import distributed
        from reconstruct.loop.engine import run_job

        job = build_job(options)
        if nproc > 1 and not distributed.launched():  # under torchrun already: torchrun decides
            raise typer.Exit(distributed.relaunch(nproc, _command_line(options)))
        try:
            report = run_job(job, _memory_budget(options))
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
            from reconstruct.shrink import SHRUNK_DIR, shrink_folder

            _echo_shrunk(job.out / SHRUNK_DIR, shrink_folder(job.out, job.out / SHRUNK_DIR))

    _guarded(build_and_run)


def _echo_shrunk(out: Path, summary: dict) -> None:
    """One line on a shrunk folder: parameters and weight bytes before and after."""
    params, size = summary["parameters"], summary["file_bytes"]
    typer.echo(f"wrote {out} (shrunk: {params['after']:,} parameters, was {params['before']:,}; "
               f"weight files {size['after'] / 2**20:.1f} MiB, was {size['before'] / 2**20:.1f} MiB)")


def _stop_interrupted(out: Path) -> None:
    """After Ctrl-C: one line on where the job stopped and how to resume it, then exit 130."""
    from reconstruct.parallel import distributed
    from reconstruct.state.status import interrupted_summary

    if distributed.is_main():
        typer.echo(f"\n{interrupted_summary(out)}", err=True)
    raise typer.Exit(EXIT_INTERRUPTED)


def _command_line(options: dict) -> list[str]:
    """``run`` and its flags that differ from their defaults, ``--nproc`` left out (what torchrun starts)."""
    args = ["run"]
    for name, param in inspect.signature(run, eval_str=True).parameters.items():
        value = options.get(name)
        if name == "nproc" or value is None or value == param.default:
            continue
        info = next((m for m in getattr(param.annotation, "__metadata__", ()) if hasattr(m, "param_decls")), None)
        decls = (info.default, *(info.param_decls or ())) if info is not None else ()  # Option("--eval", ...)
        flag = next((d.split("/")[0] for d in decls if isinstance(d, str) and d.startswith("--")),
                    "--" + name.replace("_", "-"))
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            args += [flag, str(value.value if isinstance(value, Enum) else value)]
    return args


def build_job(options: dict):
    """The JobConfig for the flags of ``run`` (``options``: its parameters by name)."""
    from pruners.pattern import SparsityPattern
    from reconstruct.config import CalibSpec, EvalSpec, JobConfig, PruneSpec
    from reconstruct.methods import ReconSpec

    o = options
    spec = SparsityPattern.parse(o["pattern"], o["sparsity"], _choice(o["mask_scope"]))
    chosen = o["method"].value
    if chosen == "auto":
        chosen = "masklora" if spec.sparsity >= MASKLORA_FROM_SPARSITY else "bias-ln"
        logger.info("--method auto chose %s for sparsity %.2f", chosen, spec.sparsity)
    if o["recon_steps"] is not None and o.get("recon_epochs") is not None:
        raise ValueError("give --recon-steps or --recon-epochs, not both")
    overrides = dict(steps=o["recon_steps"], lr=o["lr"], batch_size=o["recon_batch"], weight_decay=o["weight_decay"])
    recon = ReconSpec(
        method=chosen, rank=o["rank"], alpha=o["alpha"], allow_dense_merge=o["allow_dense_merge"],
        granularity=_choice(o["granularity"]), target=_choice(o["target"]), **{k: v for k, v in overrides.items() if v is not None},
        epochs=o.get("recon_epochs"), val_fraction=o.get("recon_val", 0.125), eval_every=o.get("recon_eval_every", 8),
        patience=o.get("recon_patience", 3), guard=o.get("recon_guard", True),
    )
    return JobConfig(
        model=o["model"],
        out=o["out"] or _default_out(o["model"], o["pruner"].value, o["pattern"], o["sparsity"]),
        prune=PruneSpec(
            pruner=o["pruner"].value, pattern=spec, sequential=o["sequential"], cycles=o.get("cycles", 1),
            heads_per_kv_group=bool(o.get("shrink")) and spec.kind == "heads",
            cycle_schedule=_choice(o.get("cycle_schedule", "cubic")), loraprune_steps=o.get("loraprune_steps", 20),
            loraprune_rank=o.get("loraprune_rank", 8), loraprune_lr=o.get("loraprune_lr", 2e-2),
        ),
        calib=CalibSpec(source=o["calib"], n_samples=o["n_samples"], seq_len=o["seq_len"], seed=o["seed"],
                        bos=_choice(o.get("calib_bos", "auto"))),
        recon=recon,
        device=o["device"],
        dtype=o["dtype"].value,
        micro_batch=o["micro_batch"],
        offload=o["offload"].value,
        checkpoint_every=o["checkpoint_every"],
        track_error=o.get("track_error", False),
        force=o["force"],
        evaluation=EvalSpec(o["eval_data"], o["eval_seq_len"], o["eval_windows"]) if o.get("eval_data") else None,
        shrink=bool(o.get("shrink")),
    )


def _choice(value) -> str:
    """An Enum option's string (options built by hand may hold the plain string)."""
    return value.value if isinstance(value, Enum) else value


def _memory_budget(options: dict):
    from reconstruct.planner import MemoryBudget, parse_bytes

    gpu, host = options["gpu_memory"], options["host_memory"]
    return MemoryBudget(
        device_bytes=parse_bytes(gpu, "--gpu-memory") if gpu is not None else None,
        host_bytes=parse_bytes(host, "--host-memory") if host is not None else None,
    )


def plan(
    config: Annotated[Optional[Path], typer.Option(help="Plan from this config.json alone (no weights needed).", show_default="--model's config")] = None,
    **options,
) -> None:
    """Print the memory plan of `run` with the same flags (block, streams, working set, peaks), doing no work.

    --device auto plans for a GPU when this machine has one or --gpu-memory is given, else for the CPU.
    Exit code 0 when the plan fits its budgets, 3 when it does not, 2 on bad input.
    """
    _setup_logging(options["verbose"])

    def show():
        from reconstruct.planner import plan_from_config

        job = build_job({"out": None, "force": False, **options})
        memory_plan = plan_from_config(job, config, _memory_budget(options))
        typer.echo(memory_plan.format())
        if not memory_plan.fits:
            raise typer.Exit(EXIT_PLAN_DOES_NOT_FIT)

    _guarded(show)


# `plan` takes every flag of `run` (same names, types and help) except those about the output folder.
plan.__signature__ = inspect.Signature(
    [inspect.signature(plan, eval_str=True).parameters["config"]]
    + [p for name, p in inspect.signature(run, eval_str=True).parameters.items() if name not in ("out", "force", "shrink", *EVAL_FLAGS)]
)
app.command("plan")(plan)


@app.command("eval")
def evaluate(
    model: Annotated[str, typer.Option(help="Model folder, .gguf, alias or hub id.")] = DEFAULT_MODEL,
    data: Annotated[Optional[str], typer.Option(help="Perplexity test text: a .txt/.jsonl file or wikitext2, c4, ptb.", show_default="wikitext2 when no --tasks")] = None,
    tasks: Annotated[Optional[str], typer.Option(help="Zero-shot tasks, comma-separated: piqa is built in (with --task-data); others need lm-eval-harness installed.", show_default="none")] = None,
    task_data: Annotated[Optional[Path], typer.Option(help="Folder holding piqa/valid.jsonl and piqa/valid-labels.lst (or the piqa folder itself).", show_default="none")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="--tasks: score only the first N questions of each task.", show_default="all")] = None,
    seq_len: Annotated[Optional[int], typer.Option(min=2, help="Tokens per window (windows do not overlap).", show_default="the smaller of 2048 and the model's context length")] = None,
    max_windows: Annotated[Optional[int], typer.Option(min=1, help="Evaluate only the first N windows.", show_default="all")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Windows (or task sequences) per forward.")] = 1,
    calib_bos: Annotated[BosMode, typer.Option(help=BOS_HELP + " Perplexity windows: BOS + T-1 text tokens; tasks: BOS before each context.")] = BosMode.auto,
    stream: Annotated[Optional[bool], typer.Option("--stream/--no-stream", help="Run the model one block at a time.", show_default="only when it does not fit in memory")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[Dtype, typer.Option(help="Compute dtype.")] = Dtype.auto,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.", show_default="off")] = False,
) -> None:
    """Perplexity on non-overlapping windows of a test text, and zero-shot task accuracy (prints JSON)."""
    _setup_logging(verbose)

    def evaluate_model():
        from reconstruct.evaluation.perplexity import perplexity
        from reconstruct.evaluation.zero_shot import evaluate_tasks

        task_names = [name.strip() for name in (tasks or "").split(",") if name.strip()]
        common = dict(device=device, dtype=dtype.value, batch_size=batch_size, stream=stream, bos=calib_bos.value)
        result: dict = {}
        if data is not None or not task_names:
            result = perplexity(model, data or "wikitext2", seq_len=seq_len, max_windows=max_windows, **common)
        if task_names:
            result["tasks"] = evaluate_tasks(model, task_names, task_data, limit, **common)
        typer.echo(json.dumps(result))

    _guarded(evaluate_model)


@app.command()
def status(out: Annotated[Path, typer.Argument(help="A job's output folder.")]) -> None:
    """Blocks done / total, elapsed and estimated time left, and the job's settings."""

    def show():
        from reconstruct.state.status import describe_job

        typer.echo(describe_job(out))

    _guarded(show)


def sweep(
    eval_data: Annotated[str, typer.Option(help="Perplexity test text for every cell (.txt/.jsonl file or wikitext2, c4, ptb).")],
    out: Annotated[Path, typer.Option(help="Sweep folder: cells go to OUT/<cell>, results to OUT/sweep.{md,csv,png}.")],
    pruner: Annotated[str, typer.Option(help="Pruners, comma-separated: magnitude, wanda, sparsegpt.")] = "wanda",
    sparsity: Annotated[str, typer.Option(help="Sparsities for the unstructured pattern, comma-separated, e.g. 0.5,0.6,0.7.")] = "0.5",
    pattern: Annotated[str, typer.Option(help="Patterns, comma-separated: unstructured and/or N:M such as 2:4 (N:M implies its sparsity).")] = "unstructured",
    method: Annotated[str, typer.Option(help="Reconstruction methods, comma-separated, e.g. none,bias-ln,masklora.")] = "none,bias-ln,masklora",
    eval_seq_len: Annotated[Optional[int], typer.Option(min=2, help="Tokens per evaluation window.", show_default="the smaller of 2048 and the model's context length")] = None,
    eval_windows: Annotated[Optional[int], typer.Option(min=1, help="Evaluate only the first N windows.", show_default="all")] = None,
    **options,
) -> None:
    """Run a grid of pruner × pattern × sparsity × method (each cell a resumable job), evaluate each, and tabulate."""
    _setup_logging(options["verbose"])

    def run_grid():
        from reconstruct.config import EvalSpec
        from reconstruct.reporting.sweep import SweepSpec, checked_spec, flags_from_options, run_sweep

        def values(text: str) -> tuple[str, ...]:
            return tuple(part.strip() for part in text.split(",") if part.strip())

        try:
            sparsities = tuple(float(value) for value in values(sparsity))
        except ValueError:
            raise ValueError(f"--sparsity must be comma-separated numbers such as 0.5,0.6; got {sparsity!r}") from None
        run_defaults = {name: p.default for name, p in inspect.signature(run, eval_str=True).parameters.items()}
        spec = SweepSpec(
            out=out, pruners=values(pruner), patterns=values(pattern), sparsities=sparsities, methods=values(method),
            evaluation=EvalSpec(eval_data, eval_seq_len, eval_windows),
            run_flags=flags_from_options(options, run_defaults),
        )
        spec = checked_spec(spec, _choice(options["mask_scope"]), options["model"], options["seq_len"])
        rows = run_sweep(spec, _choice(options["mask_scope"]))
        typer.echo(f"wrote {out / 'sweep.md'}, sweep.csv and sweep.png ({len(rows)} cells)")

    _guarded(run_grid)


# `sweep` takes the flags of `run` that every cell shares (model, calibration, device, ...); the grid's
# own lists replace --pruner/--sparsity/--pattern/--method, and --out/--eval are the sweep's.
_SWEEP_OWN = [p for p in inspect.signature(sweep, eval_str=True).parameters.values() if p.kind != p.VAR_KEYWORD]
sweep.__signature__ = inspect.Signature(
    _SWEEP_OWN
    + [p for name, p in inspect.signature(run, eval_str=True).parameters.items()
       if name not in ("pruner", "sparsity", "pattern", "method", "out", "force", "shrink", *EVAL_FLAGS)]
)
app.command("sweep")(sweep)


@app.command("shrink")
def shrink_model_folder(
    folder: Annotated[Path, typer.Argument(help="A model folder whose heads or MLP channels are zeroed (a reconstruct run output, or any folder: all-zero groups are found).")],
    out: Annotated[Path, typer.Option(help="The new, smaller model folder (an interrupted shrink there resumes).")],
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.", show_default="off")] = False,
) -> None:
    """Delete removed heads/channels: smaller matrices and config that stock transformers loads, same function."""
    _setup_logging(verbose)

    def write():
        from reconstruct.shrink import shrink_folder

        _echo_shrunk(out, shrink_folder(folder, out))

    _guarded(write)


@app.command("inspect")
def inspect_model_folder(
    folder: Annotated[Path, typer.Argument(help="A Hugging Face model folder (pruned or dense).")],
    nm: Annotated[Optional[str], typer.Option(help="Check N:M compliance, e.g. 2:4: at most N non-zeros in every M weights along the input.", show_default="no check")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.", show_default="off")] = False,
    layers: Annotated[bool, typer.Option("--layers", help="One row per layer, not only per block.", show_default="off")] = False,
) -> None:
    """Sparsity per block of a model folder (per layer with --layers), read tensor by tensor; N:M compliance with --nm."""

    def show():
        from reconstruct.reporting.inspect import format_table, inspect_folder

        result = inspect_folder(folder, nm)
        typer.echo(json.dumps(result, indent=2) if as_json else format_table(result, per_layer=layers))

    _guarded(show)


if __name__ == "__main__":
    app()
