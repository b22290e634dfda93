"""The results of ``reconstruct sweep``: ``sweep.csv``, ``sweep.md`` and ``sweep.png``.

A dense row first, then one row per cell; with ``--eval-tasks`` a column per task (its headline
metric: acc_norm, else acc). The figure is perplexity vs sparsity, one line per method, one panel
per pruner. The sweep itself (cells, child processes, resume) is ``reconstruct.jobs.sweep``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from reconstruct.atomic import atomic_write_bytes
from reconstruct.evaluation.tasks import headline_metric
from reconstruct.reporting.plots import INSTALL_HINT, plot_sweep
from reconstruct.reporting.report import format_or_dash

CSV_NAME, MARKDOWN_NAME, FIGURE_NAME = "sweep.csv", "sweep.md", "sweep.png"
DENSE_NAME = "dense.json"  # the dense model's evaluation and the command that made it
DENSE_CELL = "dense"
COLUMNS = ("cell", "pruner", "pattern", "sparsity", "method", "perplexity", "achieved_sparsity", "time_s",
           "peak_rss_mb", "peak_gpu_mb", "trainable_share", "eval_seconds")


def task_columns(task_evaluation: dict | None) -> dict:
    """``{"piqa acc_norm": 0.62, ...}``: one column per task of ``--eval-tasks`` (its headline metric)."""
    columns = {}
    for task, metrics in ((task_evaluation or {}).get("results") or {}).items():
        headline = headline_metric(metrics)
        if headline is not None:
            columns[f"{task} {headline[0]}"] = headline[1]
    return columns


def _task_keys(rows: list[dict]) -> list[str]:
    """The task columns of the rows, in first-seen order."""
    keys: list[str] = []
    for row in rows:
        keys += [key for key in row if key not in COLUMNS and key not in keys]
    return keys


def _csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    columns = [*COLUMNS, *_task_keys(rows)]
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: ("" if row.get(key) is None else row[key]) for key in columns})
    return buffer.getvalue()


def render_markdown(spec, rows: list[dict], figure_drawn: bool) -> str:
    """The text of ``sweep.md`` (``spec``: the sweep's ``SweepSpec``: its evaluation and shared flags)."""
    evaluation = spec.evaluation
    task_keys = _task_keys(rows)
    windows = f"{evaluation.max_windows} windows" if evaluation.max_windows else "all windows"
    lines = [
        "# Sweep",
        "",
        f"{sum(row['cell'] != DENSE_CELL for row in rows)} cells and the dense model · perplexity on {Path(evaluation.data).name} ({windows} × {evaluation.seq_len} tokens) · "
        f"shared flags: `{' '.join(spec.run_flags) or '(defaults)'}`",
        "",
        "| pruner | pattern | sparsity | method | perplexity | " + "".join(f"{key} | " for key in task_keys)
        + "time | peak RSS | trainable share | cell |",
        "|---|---|---:|---|---:|" + "---:|" * len(task_keys) + "---:|---:|---:|---|",
    ]
    for row in rows:
        if row["cell"] == DENSE_CELL:
            lines.append(f"| dense | - | 0.00 | - | {format_or_dash(row['perplexity'], '.3f')} | " + "- | " * len(task_keys)
                         + "- | - | - | "
                         f"[{DENSE_NAME}]({DENSE_NAME}) |")
            continue
        lines.append(
            f"| {row['pruner']} | {row['pattern']} | {row['sparsity']:.2f} | {row['method']} | "
            f"{format_or_dash(row['perplexity'], '.3f')} | " + "".join(f"{format_or_dash(row.get(key), '.4f')} | " for key in task_keys)
            + f"{format_or_dash(row['time_s'], '.1f')} s | {format_or_dash(row['peak_rss_mb'], '.0f')} MiB | "
            f"{row['trainable_share']:.4%} | [{row['cell']}]({row['cell']}/report.md) |"
        )
    lines.append("")
    if figure_drawn:
        lines += [f"![perplexity vs sparsity]({FIGURE_NAME})", ""]
    else:
        lines += [f"No {FIGURE_NAME}: matplotlib is not installed (`{INSTALL_HINT}`); run the sweep again to draw it.", ""]
    return "\n".join(lines)


def write_results(spec, rows: list[dict]) -> None:
    """``sweep.csv``, ``sweep.png`` (when matplotlib is installed) and ``sweep.md`` in ``spec.out``."""
    atomic_write_bytes(spec.out / CSV_NAME, _csv_text(rows).encode("utf-8"))
    drawn = plot_sweep([row for row in rows if row["cell"] != DENSE_CELL], spec.out / FIGURE_NAME)
    if not drawn:
        (spec.out / FIGURE_NAME).unlink(missing_ok=True)
    atomic_write_bytes(spec.out / MARKDOWN_NAME, render_markdown(spec, rows, drawn).encode("utf-8"))
