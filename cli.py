"""Command line: ``reconstruct run | eval | status``. Parses, validates, builds a JobConfig; no logic."""

from __future__ import annotations

import errno
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
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: derived from model and settings).")] = None,
    force: Annotated[bool, typer.Option(help="Start over even if --out holds a different or unfinished job.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Prune every linear layer of every block, reconstruct, and write a loadable model folder."""
    _setup_logging(verbose)

    def build_and_run():
        from pruners.pattern import SparsityPattern
        from reconstruct.config import CalibSpec, JobConfig, PruneSpec
        from reconstruct.engine import run_job
        from reconstruct.methods import ReconSpec

        spec = SparsityPattern.parse(pattern, sparsity, mask_scope)
        chosen = method.value
        if chosen == "auto":
            chosen = "masklora" if spec.sparsity >= MASKLORA_FROM_SPARSITY else "bias-ln"
            logger.info("--method auto chose %s for sparsity %.2f", chosen, spec.sparsity)
        overrides = {k: v for k, v in dict(steps=recon_steps, lr=lr, batch_size=recon_batch, weight_decay=weight_decay).items() if v is not None}
        recon = ReconSpec(method=chosen, rank=rank, alpha=alpha, allow_dense_merge=allow_dense_merge, **overrides)
        job = JobConfig(
            model=model,
            out=out or _default_out(model, pruner.value, pattern, sparsity),
            prune=PruneSpec(pruner=pruner.value, pattern=spec, sequential=sequential),
            calib=CalibSpec(source=calib, n_samples=n_samples, seq_len=seq_len, seed=seed),
            recon=recon,
            device=device,
            dtype=dtype.value,
            micro_batch=micro_batch,
            offload=offload.value,
            checkpoint_every=checkpoint_every,
            force=force,
        )
        report = run_job(job)
        typer.echo(f"wrote {job.out} (mean linear sparsity {report.get('mean_linear_sparsity', 0):.4f})")

    _guarded(build_and_run)


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
