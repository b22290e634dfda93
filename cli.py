"""Command line: ``reconstruct run | eval | status``. Parses, validates, builds a JobConfig; no logic."""

from __future__ import annotations

import errno
import inspect
import json
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Prune an LLM block by block and repair it by layer-wise reconstruction.",
)
logger = logging.getLogger("reconstruct")

EXIT_BAD_INPUT = 2
DEFAULT_MODEL = "smollm2-135m"


class PrunerName(str, Enum):
    magnitude = "magnitude"
    wanda = "wanda"
    sparsegpt = "sparsegpt"


class MethodName(str, Enum):
    auto = "auto"
    none = "none"
    bias = "bias"
    ln = "ln"
    bias_ln = "bias-ln"
    masklora = "masklora"
    scalelora = "scalelora"
    lora = "lora"


class Offload(str, Enum):
    auto = "auto"
    device = "device"
    cpu = "cpu"
    disk = "disk"


class Dtype(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


MASKLORA_FROM_SPARSITY = 0.6  # --method auto: bias-ln below this sparsity, masklora at or above


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
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
    return Path(f"{stem}-{pruner}-{shape}")


@app.command()
def run(
    model: Annotated[str, typer.Option(help="Local HF folder, .gguf file, hub id or alias (opt-30b, smollm2-135m).")] = DEFAULT_MODEL,
    pruner: Annotated[PrunerName, typer.Option(help="How weights are scored.")] = PrunerName.wanda,
    sparsity: Annotated[Optional[float], typer.Option(help="Fraction of weights removed, in [0, 1). Default 0.5; implied by N:M.")] = None,
    pattern: Annotated[str, typer.Option(help="'unstructured' or N:M (N kept of every M along the input), e.g. 2:4.")] = "unstructured",
    mask_scope: Annotated[str, typer.Option(help="Unstructured: equal sparsity per output 'row' or per 'layer'.")] = "row",
    method: Annotated[MethodName, typer.Option(help="Reconstruction: auto = bias-ln below 60% sparsity, masklora at or above.")] = MethodName.auto,
    recon_steps: Annotated[Optional[int], typer.Option(min=0, help="Optimizer steps per block (method default if omitted).")] = None,
    lr: Annotated[Optional[float], typer.Option(min=0.0, help="AdamW learning rate (linear decay to 0).")] = None,
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank (masklora, scalelora, lora).")] = 16,
    alpha: Annotated[float, typer.Option(min=0.0, help="LoRA alpha; the update is scaled by alpha/rank.")] = 32.0,
    recon_batch: Annotated[Optional[int], typer.Option(min=1, help="Calibration samples per optimizer step.")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(min=0.0, help="AdamW weight decay.")] = None,
    granularity: Annotated[str, typer.Option(help="What reconstruction matches: 'block', 'sublayer' (attention and MLP separately) or 'linear'.")] = "block",
    target: Annotated[str, typer.Option(help="Reconstruction target: 'dense' = dense block on the dense stream (PERP), 'local' = dense block on the pruned stream.")] = "dense",
    allow_dense_merge: Annotated[bool, typer.Option(help="--method lora only: accept that merging refills pruned weights.")] = False,
    calib: Annotated[str, typer.Option(help="Calibration text: 'self' (sampled from the model, no data needed), wikitext2, c4, ptb, or a .txt/.jsonl file.")] = "self",
    n_samples: Annotated[int, typer.Option(min=1, help="Calibration sequences.")] = 128,
    seq_len: Annotated[int, typer.Option(min=2, help="Tokens per calibration sequence.")] = 2048,
    seed: Annotated[int, typer.Option(help="Seed for calibration sampling and reconstruction.")] = 0,
    sequential: Annotated[bool, typer.Option(help="Prune sub-layer groups in order (q/k/v, o, up/gate, down), re-collecting statistics between them.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[Dtype, typer.Option(help="Compute dtype; auto = float32 on CPU, the checkpoint's dtype on GPU.")] = Dtype.auto,
    micro_batch: Annotated[int, typer.Option(min=1, help="Samples per block forward.")] = 8,
    offload: Annotated[Offload, typer.Option(help="Where the activation cache lives.")] = Offload.auto,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Checkpoint the activation streams every k blocks.")] = 1,
    gpu_memory: Annotated[Optional[str], typer.Option(help="GPU memory the job may use, e.g. 24GiB or 80GB (default: the GPU's free memory).")] = None,
    host_memory: Annotated[Optional[str], typer.Option(help="Host memory the job may use, e.g. 64GiB (default: available memory).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: derived from model and settings).")] = None,
    force: Annotated[bool, typer.Option(help="Start over even if --out holds a different or unfinished job.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Prune every linear layer of every block, reconstruct, and write a loadable model folder."""
    options = dict(locals())  # every flag by name: build_job and the memory budget read them
    _setup_logging(verbose)

    def build_and_run():
        from reconstruct.engine import run_job

        job = build_job(options)
        report = run_job(job, _memory_budget(options))
        typer.echo(f"wrote {job.out} (mean linear sparsity {report.get('mean_linear_sparsity', 0):.4f})")

    _guarded(build_and_run)


def build_job(options: dict):
    """The JobConfig for the flags of ``run`` (``options``: its parameters by name)."""
    from pruners.pattern import SparsityPattern
    from reconstruct.config import CalibSpec, JobConfig, PruneSpec
    from reconstruct.methods import ReconSpec

    o = options
    spec = SparsityPattern.parse(o["pattern"], o["sparsity"], o["mask_scope"])
    chosen = o["method"].value
    if chosen == "auto":
        chosen = "masklora" if spec.sparsity >= MASKLORA_FROM_SPARSITY else "bias-ln"
        logger.info("--method auto chose %s for sparsity %.2f", chosen, spec.sparsity)
    overrides = dict(steps=o["recon_steps"], lr=o["lr"], batch_size=o["recon_batch"], weight_decay=o["weight_decay"])
    recon = ReconSpec(
        method=chosen, rank=o["rank"], alpha=o["alpha"], allow_dense_merge=o["allow_dense_merge"],
        granularity=o["granularity"], target=o["target"], **{k: v for k, v in overrides.items() if v is not None},
    )
    return JobConfig(
        model=o["model"],
        out=o["out"] or _default_out(o["model"], o["pruner"].value, o["pattern"], o["sparsity"]),
        prune=PruneSpec(pruner=o["pruner"].value, pattern=spec, sequential=o["sequential"]),
        calib=CalibSpec(source=o["calib"], n_samples=o["n_samples"], seq_len=o["seq_len"], seed=o["seed"]),
        recon=recon,
        device=o["device"],
        dtype=o["dtype"].value,
        micro_batch=o["micro_batch"],
        offload=o["offload"].value,
        checkpoint_every=o["checkpoint_every"],
        force=o["force"],
    )


def _memory_budget(options: dict):
    from reconstruct.planner import MemoryBudget, parse_bytes

    gpu, host = options["gpu_memory"], options["host_memory"]
    return MemoryBudget(
        device_bytes=parse_bytes(gpu, "--gpu-memory") if gpu is not None else None,
        host_bytes=parse_bytes(host, "--host-memory") if host is not None else None,
    )


def plan(
    config: Annotated[Optional[Path], typer.Option(help="Plan from this config.json alone (no weights needed); default: --model's config.")] = None,
    **options,
) -> None:
    """Print the memory plan of `run` with the same flags (block, streams, working set, peaks), doing no work."""
    _setup_logging(options["verbose"])

    def show():
        from reconstruct.planner import plan_from_config

        job = build_job({"out": None, "force": False, **options})
        memory_plan = plan_from_config(job, config, _memory_budget(options))
        typer.echo(memory_plan.format())

    _guarded(show)


# `plan` takes every flag of `run` (same names, types and help) except those about the output folder.
plan.__signature__ = inspect.Signature(
    [inspect.signature(plan, eval_str=True).parameters["config"]]
    + [p for name, p in inspect.signature(run, eval_str=True).parameters.items() if name not in ("out", "force")]
)
app.command("plan")(plan)


@app.command("eval")
def evaluate(
    model: Annotated[str, typer.Option(help="Model folder, .gguf, alias or hub id.")] = DEFAULT_MODEL,
    data: Annotated[str, typer.Option(help="Test text: a .txt/.jsonl file or wikitext2, c4, ptb.")] = "wikitext2",
    seq_len: Annotated[int, typer.Option(min=2, help="Tokens per window (windows do not overlap).")] = 2048,
    max_windows: Annotated[Optional[int], typer.Option(min=1, help="Evaluate only the first N windows.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[Dtype, typer.Option(help="Compute dtype.")] = Dtype.auto,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Perplexity on non-overlapping windows of a test text (prints JSON)."""
    _setup_logging(verbose)

    def evaluate_model():
        from reconstruct.evaluate import perplexity

        result = perplexity(model, data, seq_len=seq_len, max_windows=max_windows, device=device, dtype=dtype.value)
        typer.echo(json.dumps(result))

    _guarded(evaluate_model)


@app.command()
def status(out: Annotated[Path, typer.Argument(help="A job's output folder.")]) -> None:
    """Blocks done / total, elapsed and estimated time left, and the job's settings."""

    def show():
        from reconstruct.job_status import describe_job

        typer.echo(describe_job(out))

    _guarded(show)


if __name__ == "__main__":
    app()
