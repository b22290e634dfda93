"""The end of a job: evaluate its output when asked (``--eval``, ``--eval-tasks``), then write its report.

``finish_report`` ends the assembly of a job's output: it evaluates the output when ``--eval`` asked
for it, then writes the report files. ``refresh_finished_report`` serves a finished job run again: it
adds an evaluation asked for only now and redraws missing files.
"""

from __future__ import annotations

import logging
from pathlib import Path

from reconstruct.evaluation.perplexity import perplexity
from reconstruct.modelio.folder_layout import FIGURE_NAME, MARKDOWN_NAME
from reconstruct.reporting.plots import matplotlib_available
from reconstruct.reporting.report import write_run_report

logger = logging.getLogger(__name__)


def evaluation_settings(spec) -> dict:
    """What identifies an evaluation (``EvalSpec``): a file by its absolute path, a dataset by name."""
    path = Path(spec.data).expanduser()
    data = str(path.resolve()) if path.is_file() else spec.data
    return {"data": data, "seq_len": spec.seq_len, "max_windows": spec.max_windows}


def add_evaluation(job, report: dict) -> tuple[dict, bool]:
    """Evaluate the output folder when ``job.evaluation`` asks and ``report`` does not hold that evaluation.

    Returns:
        ``(report, evaluated)``: the report with ``"evaluation"`` (settings and result) added when it ran.
    """
    if job.evaluation is None:
        return report, False
    settings = evaluation_settings(job.evaluation)
    recorded = report.get("evaluation") or {}
    if {key: recorded.get(key) for key in settings} == settings:
        return report, False
    spec = job.evaluation
    logger.info("evaluating %s on %s", job.out, spec.data)
    result = perplexity(str(job.out), spec.data, seq_len=spec.seq_len, max_windows=spec.max_windows,
                        device=job.device, dtype=job.dtype, bos=job.calib.bos)
    return {**report, "evaluation": {**settings, **result}}, True


def add_task_evaluation(job, report: dict) -> tuple[dict, bool]:
    """Run ``job.task_evaluation`` (``--eval-tasks``) on the output unless ``report`` holds the same one.

    Returns:
        ``(report, evaluated)``: the report with ``"task_evaluation"`` (settings and results) when it ran.
    """
    spec = job.task_evaluation
    if spec is None:
        return report, False
    recorded = report.get("task_evaluation") or {}
    if {key: recorded.get(key) for key in spec.settings()} == spec.settings():
        return report, False
    logger.info("zero-shot tasks %s on %s", ",".join(spec.tasks), job.out)
    return {**report, "task_evaluation": spec.evaluate(str(job.out), job.device, job.dtype, job.calib.bos)}, True


def finish_report(job, report: dict) -> dict:
    """The end of assembling a job's output: evaluate it (``--eval``, ``--eval-tasks``) and write ``report.md`` / ``report.png``.

    Called when the model folder is complete and before ``reconstruct.json`` is written and the job
    marked finished, so a job killed while evaluating evaluates again when resumed.

    Returns:
        ``report`` with ``"evaluation"`` when one ran: the content of ``reconstruct.json``.
    """
    report, _ = add_evaluation(job, report)
    report, _ = add_task_evaluation(job, report)
    write_run_report(job.out, report, job.model)
    return report


def refresh_finished_report(job, state) -> dict:
    """A finished job run again: add an evaluation newly asked for, redraw missing report files.

    Args:
        job: the ``JobConfig``.
        state: the job's ``JobState`` (its lock is held).

    Returns:
        The content of ``reconstruct.json``.
    """
    out = Path(job.out)
    report, evaluated = add_evaluation(job, state.report())
    report, tasks_evaluated = add_task_evaluation(job, report)
    evaluated = evaluated or tasks_evaluated
    if evaluated:
        state.update_report(report)
    figure_missing = not (out / FIGURE_NAME).is_file() and matplotlib_available()
    if evaluated or figure_missing or not (out / MARKDOWN_NAME).is_file():
        write_run_report(out, report, job.model)
    return report
