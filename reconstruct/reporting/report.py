"""The human-readable run report: ``report.md`` and ``report.png`` next to ``reconstruct.json``.

``write_run_report`` renders what ``reconstruct.json`` holds (per block: MSE before and after
reconstruction, achieved sparsity; totals: time, peak memory, trainable parameters, perplexity when
the run evaluated its output). The evaluations themselves run in ``reconstruct.jobs.finish``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from reconstruct.atomic import atomic_write_bytes
from reconstruct.evaluation.tasks import describe_results
from reconstruct.reporting.plots import INSTALL_HINT, plot_blocks
from reconstruct.reporting.loraprune_report import FIGURE_NAME as LORAPRUNE_FIGURE
from reconstruct.reporting.loraprune_report import loraprune_section, plot_loraprune
from reconstruct.modelio.folder_layout import FIGURE_NAME, MARKDOWN_NAME
from reconstruct.reporting.retrain_report import run_retrain_section

logger = logging.getLogger(__name__)


def block_rows(report: dict) -> list[dict]:
    """One row per block: index, mean linear sparsity, MSE before/after, trainable params, steps, seconds."""
    rows = []
    for block in report.get("blocks", []):
        sparsities = list((block.get("sparsity") or {}).values())
        rows.append({
            "index": block.get("index"),
            "sparsity": sum(sparsities) / len(sparsities) if sparsities else 0.0,
            "mse_before": block.get("mse_before"),
            "mse_after": block.get("mse_after"),
            "target_mean_square": block.get("target_mean_square"),
            "trainable_params": int(block.get("trainable_params", 0)),
            "block_params": int(block.get("block_params", 0)),
            "recon_steps": int(block.get("recon_steps", 0)),
            "seconds": float(block.get("seconds", 0.0)),
            "train_error": block.get("train_error"),
            "val_before": block.get("val_before"),
            "val_after": block.get("val_after"),
            "recon_kept": block.get("recon_kept"),
            "recon_stopped_at": block.get("recon_stopped_at"),
            "target_sparsity": block.get("target_sparsity"),
        })
    return rows


def kept_summary(rows: list[dict]) -> str | None:
    """``"k of n"`` blocks that kept their repair under the guard; None when no block was guarded."""
    guarded = [row for row in rows if row["recon_kept"] is not None]
    if not guarded:
        return None
    return f"{sum(1 for row in guarded if row['recon_kept'])} of {len(guarded)}"


def _verdict(row: dict) -> str:
    """The guard column: kept / undone / – (no guard)."""
    if row["recon_kept"] is None:
        return "–"
    return "kept" if row["recon_kept"] else "undone"


def describe_job(report: dict, model: str | None) -> dict[str, str]:
    """Short labels for the job's settings, from the fingerprint stored in the report."""
    job = report.get("job", {})
    pattern = job.get("pattern") or {}
    kind = pattern.get("kind", "unstructured")
    if kind == "nm":
        shape = f"{pattern.get('n')}:{pattern.get('m')} ({pattern.get('sparsity', 0):.0%})"
    elif kind == "unstructured":
        shape = f"unstructured {pattern.get('sparsity', 0):.0%} per {pattern.get('scope', 'row')}"
    else:  # structured: the share of heads / channels removed
        shape = f"{kind} {pattern.get('sparsity', 0):.0%}"
    method = job.get("method") or {}
    calibration = job.get("calibration") or {}
    source = calibration.get("source") or {}
    return {
        "model": model or "(see reconstruct.json)",
        "architecture": str(job.get("model_type", "?")),
        "pruner": str(job.get("pruner", "?")),
        "pattern": shape,
        "method": str(method.get("method", "none")),
        "calibration": f"{source.get('file') or source.get('name', '?')}, "
                       f"{calibration.get('n_samples', '?')} × {calibration.get('seq_len', '?')} tokens, seed {job.get('seed', '?')}, "
                       f"{framing_label(calibration.get('bos_id'))}",
        "compute": f"{job.get('dtype', '?')} on {job.get('device_type', '?')}",
    }


def job_loss(job: dict) -> str:
    """The job's ``--recon-loss`` (fingerprints older than the flag used the MSE)."""
    return (job.get("method") or {}).get("loss", "mse")


def loss_label(job: dict) -> str:
    """The reconstruction loss of the job, in words."""
    if job_loss(job) == "mse":
        return "MSE"
    return "each token's squared error over its target's squared norm, averaged"


def validation_label(job: dict) -> str:
    """What judged the repairs: held-out calibration samples, or ``--recon-val-data``'s windows (the fingerprint's)."""
    validation = job.get("validation")
    if not validation:
        return "the held-out calibration samples (`--recon-val`)"
    source = validation.get("source") or {}
    return (f"{validation.get('n_samples', '?')} windows of {source.get('file') or source.get('name', '?')} "
            "(`--recon-val-data`; every calibration sample trained; MSE columns: calibration samples only)")


def framing_label(bos_id: int | None) -> str:
    """How the job's windows started (the fingerprint's ``calibration.bos_id``; absent: no BOS)."""
    return "windows without BOS" if bos_id is None else f"windows start with BOS id {bos_id}"


def target_sparsity(report: dict) -> float | None:
    """The sparsity the job asked for."""
    value = (report.get("job", {}).get("pattern") or {}).get("sparsity")
    return float(value) if value is not None else None


def format_or_dash(value, spec: str) -> str:
    """``format(value, spec)``, or "–" for a value that was not measured (None)."""
    return "–" if value is None else format(value, spec)


def io_summary(io: dict) -> str:
    """What bounds the job, from ``reconstruct.json``'s ``io`` totals (``loop.overlap.io_totals``), in one line."""
    mode = {(True,): "IO in the background", (False,): "IO in series (--no-overlap)"}.get(tuple(io.get("overlap", [])),
                                                                                      "IO in the background in part")
    return (f"computing {_duration(io['compute_seconds'])}, waiting for reads {_duration(io['read_wait_seconds'])}, "
            f"waiting for writes {_duration(io['write_wait_seconds'])} ({mode}): bound by {io['bound_by']}")


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


def allocation_note(allocation: dict) -> str:
    """The paragraph above the block table of a job with ``--allocation`` (OWL or a file)."""
    how = (f"OWL (outlier threshold M = {allocation.get('owl_m')}, λ = {allocation.get('owl_lambda')}): blocks "
           "whose Wanda scores on the dense model hold more outliers are pruned less"
           if allocation.get("kind") == "owl" else f"explicit, from {allocation.get('file', 'a file')}")
    return (f"Allocation: {how}. Target: each block's own sparsity; their mean weighted by the blocks' prunable "
            f"weights is {allocation.get('mean_sparsity', 0.0):.4f} (asked: {allocation.get('target', 0.0):.4f}). "
            "Pruners remove a whole number of weights per row, so a block's sparsity is below its target by less "
            "than one weight per row.")


def target_cell(report: dict, row: dict) -> str:
    """`` 0.6756 |`` (the block's target) when the job has an allocation, else nothing."""
    if not report.get("allocation"):
        return ""
    return f" {format_or_dash(row['target_sparsity'], '.4f')} |"


def render_markdown(report: dict, model: str | None, figure_drawn: bool) -> str:
    """The text of ``report.md``: a header line, the totals, the retraining stage, the blocks, the figure."""
    rows = block_rows(report)
    labels = describe_job(report, model)
    lines = [
        f"# Reconstruction report: {labels['model']}",
        "",
        f"{labels['pruner']} · {labels['pattern']} · method {labels['method']} · {labels['architecture']}, "
        f"{len(rows)} blocks · calibration {labels['calibration']} · {labels['compute']}",
        "",
        *_totals_section(report, rows),
        "",
        *run_retrain_section(report),
        *_blocks_section(report, rows),
        "",
        *_figure_lines(figure_drawn),
    ]
    return "\n".join(lines)


def _perplexity_cell(evaluation: dict | None) -> str:
    if not evaluation:
        return "not evaluated (add `--eval FILE` to `reconstruct run`, or run `reconstruct eval --model OUT --data FILE`)"
    return (
        f"{evaluation['perplexity']:.3f} on {Path(str(evaluation['data'])).name} "
        f"({evaluation['windows']} windows × {evaluation['seq_len']} tokens, "
        f"{'streamed' if evaluation.get('streamed') else 'in memory'}, {_duration(evaluation.get('seconds', 0))})"
    )


def _totals_section(report: dict, rows: list[dict]) -> list[str]:
    trainable = sum(row["trainable_params"] for row in rows)
    block_params = sum(row["block_params"] for row in rows)
    gpu = report.get("peak_gpu_mb")
    kept = kept_summary(rows)
    checked_on = "--recon-val-data" if (report.get("job") or {}).get("validation") else "held-out samples"
    return [
        "## Totals",
        "",
        "| | |",
        "|---|---|",
        f"| time | {_duration(report.get('elapsed_seconds', 0.0))} |",
        *([f"| block time | {io_summary(report['io'])} |"] if report.get("io", {}).get("bound_by") else []),
        f"| peak host memory (RSS) | {format_or_dash(report.get('peak_rss_mb'), '.0f')} MiB |",
        f"| peak GPU memory | {'–' if gpu is None else format(gpu, '.0f') + ' MiB'} |",
        f"| trainable parameters | {trainable:,} ({trainable / max(block_params, 1):.4%} of the block parameters) |",
        f"| mean linear sparsity | {report.get('mean_linear_sparsity', 0.0):.4f} |",
        f"| perplexity | {_perplexity_cell(report.get('evaluation'))} |",
        *task_rows(report.get("task_evaluation")),
        *([f"| blocks kept their repair | {kept} (the others were undone: no better on {checked_on}) |"] if kept else []),
        *([experts_row(report["experts"])] if report.get("experts") else []),
        *model_check_rows(report.get("model_check")),
    ]


def experts_row(experts: dict) -> str:
    """The totals' row of a mixture-of-experts model: the experts that were pruned by magnitude for want of tokens."""
    return (f"| experts with few calibration tokens | {experts['few_tokens']} of {experts['experts']} experts had "
            f"fewer than {experts['min_tokens']} calibration tokens (pruned by {experts['fallback']}) |")


def model_check_rows(check: dict | None) -> list[str]:
    """``report.md``'s Totals row of ``--model-check``: the decision, both losses, the judge text."""
    if not check:
        return []
    verdict = ("kept (the repaired model's loss is no worse)" if check["decision"] == "kept"
               else "reverted: the unrepaired weights were written back (the repaired model's loss is worse)")
    return [f"| model-level check | repairs {verdict}; next-token loss repaired {check['repaired_loss']:.4f}, "
            f"without the repairs {check['unrepaired_loss']:.4f}, on {check['text']} "
            f"({check['windows']} windows × {check['seq_len']} tokens) |"]


def _blocks_section(report: dict, rows: list[dict]) -> list[str]:
    job = report.get("job") or {}
    allocated = bool(report.get("allocation"))
    lines = [
        "## Blocks",
        "",
        "MSE: the pruned block's output on the pruned stream vs the dense block's output (the targets), "
        "before and after reconstruction; – where not measured (`--method none` runs no dense model unless "
        "`--track-error` is given). Sparsity: the mean over the block's linear layers of the share of zero weights. "
        "Blocks are numbered from 1, as in the log and `reconstruct status` (shard files and `index` in "
        "reconstruct.json count from 0).",
        "",
        "Relative error: the MSE divided by the mean square of the dense block's output (0 = the dense "
        "block exactly, 1 = an error as large as the output itself); well under 0.01 means the pruned block "
        "reproduces the dense one to within 1% of its output's energy, and reconstruction should lower it.",
        "",
        f"Train: the reconstruction loss ({loss_label(job)}) on training batches at the end; "
        "val before/after: the same error on "
        f"{validation_label(job)} before training and after the merge; repair: kept, or undone "
        "(the pruned block written instead) when val after is not below val before; stop: the step whose "
        "parameters were kept (0 = none improved).",
        "",
        *([allocation_note(report["allocation"]), ""] if allocated else []),
        f"| block |{' target |' if allocated else ''} sparsity | MSE before | MSE after | after / before "
        "| relative error before | relative error after | trainable params | steps | seconds | train | val before "
        "| val after | repair | stop |",
        f"|---:|{'---:|' if allocated else ''}---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|",
    ]
    return lines + [_block_line(report, row) for row in rows]


def _block_line(report: dict, row: dict) -> str:
    before, after, scale = row["mse_before"], row["mse_after"], row["target_mean_square"]
    ratio = after / before if before and after is not None else None
    relative = [value / scale if value is not None and scale else None for value in (before, after)]
    return (
        f"| {row['index'] + 1} |{target_cell(report, row)} {row['sparsity']:.4f} | {format_or_dash(before, '.4e')} | {format_or_dash(after, '.4e')} | "
        f"{format_or_dash(ratio, '.3f')} | {format_or_dash(relative[0], '.3e')} | {format_or_dash(relative[1], '.3e')} | "
        f"{row['trainable_params']:,} | {row['recon_steps']} | {row['seconds']:.1f} | "
        f"{format_or_dash(row['train_error'], '.3e')} | {format_or_dash(row['val_before'], '.3e')} | "
        f"{format_or_dash(row['val_after'], '.3e')} | {_verdict(row)} | {format_or_dash(row['recon_stopped_at'], 'd')} |"
    )


def _figure_lines(figure_drawn: bool) -> list[str]:
    if figure_drawn:
        return [f"![MSE and sparsity per block]({FIGURE_NAME})", ""]
    return [
        f"No {FIGURE_NAME}: matplotlib is not installed. Install it (`{INSTALL_HINT}`) and run the same "
        "`reconstruct run` command again: a finished job only redraws its report.",
        "",
    ]


def write_run_report(out: Path, report: dict, model: str | None = None) -> bool:
    """Write ``report.md`` and, when matplotlib is installed, ``report.png`` into ``out``.

    Returns:
        Whether the figure was drawn.
    """
    out = Path(out)
    labels = describe_job(report, model)
    title = f"{labels['pruner']} · {labels['pattern']} · {labels['method']}"
    drawn = plot_blocks(block_rows(report), title, target_sparsity(report), out / FIGURE_NAME,
                        retrain=report.get("retrain"),
                        validation_loss=job_loss(report.get("job") or {}))
    stage = report.get("loraprune")
    stage_drawn = bool(stage) and plot_loraprune(stage, out / LORAPRUNE_FIGURE)
    if not stage_drawn:
        (out / LORAPRUNE_FIGURE).unlink(missing_ok=True)  # never leave a figure of an earlier job
    if not drawn:
        (out / FIGURE_NAME).unlink(missing_ok=True)  # never leave a figure of an earlier job
        logger.info("matplotlib is not installed: no %s (%s)", FIGURE_NAME, INSTALL_HINT)
    text = render_markdown(report, model, drawn)
    if stage:
        text += "\n" + "\n".join(loraprune_section(stage, stage_drawn))
    atomic_write_bytes(out / MARKDOWN_NAME, text.encode("utf-8"))
    return drawn


def task_rows(task_evaluation: dict | None) -> list[str]:
    """``report.md``'s Totals rows of ``--eval-tasks``: one per task, beside perplexity."""
    if not task_evaluation:
        return []
    return [f"| {task} | {text} |" for task, text in describe_results(task_evaluation["results"])]
