"""Zero-shot tasks with lm-evaluation-harness's own task definitions, on the model in memory or streamed.

``evaluate_tasks`` runs any task, group or tag name lm-eval's registry knows through
``simple_evaluate`` with ``ReconstructLM`` (``lm_eval_model.py``) as the model, so a model larger
than the GPU is scored block by block. lm-eval is an optional extra (``pip install -e ".[eval]"``);
without it ``--tasks`` fails with one line naming the extra.

Local data (``--task-data DIR``, for offline use): ``task_data.py``.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from calib.framing import resolve_framing
from reconstruct.config import LIMIT
from reconstruct.flags import REQUIRED, FlagError, flag, flag_name
from reconstruct.evaluation.task_data import task_specs
from reconstruct.evaluation.streaming import open_lm
from reconstruct.modelio.source import resolve_model
from reconstruct.modelio.architecture import load_config
from reconstruct.runtime import model_dtype, resolve_device

logger = logging.getLogger(__name__)

EXTRA_HINT = 'install the eval extra: pip install -e ".[eval]" (or pip install "reconstruct[eval]")'
SKIPPED_RESULT_KEYS = ("sample_len",)  # lm-eval's item count before --limit; "n" is the count scored
TASK_BATCH = 8  # --eval-tasks: sequences per forward (run passes its --micro-batch)
RUN_KEYS = ("seconds", "streamed", "bos_id", "max_length")  # evaluate_tasks' own entries beside lm-eval's metrics
LOGLIKELIHOOD_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice")


def require_lm_eval(flag: str = "--tasks"):
    """The ``lm_eval`` module, or a ``ValueError`` naming ``flag`` and the extra that installs it."""
    try:
        import lm_eval
    except ImportError:
        raise ValueError(f"{flag} needs lm-evaluation-harness (lm-eval), which is not installed: {EXTRA_HINT}") from None
    return lm_eval


def parse_task_names(text: str | None) -> list[str]:
    """``"piqa, arc_easy"`` → ``["piqa", "arc_easy"]`` (empty for None or blank)."""
    return [name.strip() for name in (text or "").split(",") if name.strip()]


@dataclass(frozen=True)
class TaskEvalSpec:
    """Zero-shot tasks on a finished output (``run --eval-tasks``, ``retrain --eval-tasks``)."""

    # lm-eval task, group or tag names (or custom tasks in task_data); the flag: comma-separated
    tasks: tuple[str, ...] = flag(
        REQUIRED, "--eval-tasks", "At the end, these lm-evaluation-harness tasks on the output (comma-separated, e.g. "
        "piqa,arc_easy; log-likelihood tasks only; needs the eval extra: pip install -e \".[eval]\"); recorded in "
        "reconstruct.json and report.md.", cli_type=str, unset=True, show_default="no tasks")
    # local data, DIR/<task>/
    task_data: str | None = flag(
        None, "--task-data", "Local task data for offline use: DIR/<task>/ holds a task's files "
        "(train/validation/test .jsonl in the task's dataset schema; PIQA's valid.jsonl + valid-labels.lst) or a "
        "custom lm-eval task YAML.", cli_type=Path, show_default="none: lm-eval's data from the hub")
    limit: int | None = LIMIT.field(None)  # only the first items of each task (None: all); also --eval's windows
    batch_size: int = TASK_BATCH  # sequences per forward

    def __post_init__(self) -> None:
        # Checked when the job is built, not hours later when the evaluation starts.
        tasks = flag_name(TaskEvalSpec, "tasks")
        if not self.tasks:
            raise FlagError(TaskEvalSpec, "tasks", f"is empty; name at least one task, e.g. {tasks} piqa")
        require_lm_eval(tasks)
        if self.task_data is not None and not Path(self.task_data).expanduser().is_dir():
            raise FlagError(TaskEvalSpec, "task_data", f"{self.task_data}: no such folder")
        if self.limit is not None and self.limit < 1:
            raise FlagError(TaskEvalSpec, "limit", f"must be at least 1; got {self.limit}")

    @classmethod
    def from_flags(cls, tasks: str | None, task_data: Path | str | None, limit: int | None,
                   batch_size: int | None = None) -> TaskEvalSpec | None:
        """The spec of ``--eval-tasks A,B --task-data DIR --limit N`` (None without ``--eval-tasks``).

        ``--limit`` also caps ``--eval``'s perplexity windows, so it is no refusal without ``--eval-tasks``.
        """
        if tasks is None:
            if task_data is not None:
                raise FlagError(cls, "task_data", f"only applies with {flag_name(cls, 'tasks')}")
            return None
        return cls(tuple(parse_task_names(tasks)), None if task_data is None else str(task_data), limit,
                   batch_size or TASK_BATCH)

    def settings(self) -> dict:
        """What identifies the evaluation in ``reconstruct.json``: a rerun with the same settings is skipped."""
        data = None if self.task_data is None else str(Path(self.task_data).expanduser().resolve())
        return {"tasks": list(self.tasks), "task_data": data, "limit": self.limit}

    def evaluate(self, model: str, device: str, dtype: str, bos: str) -> dict:
        """``{**settings, "results": {task: metrics}}`` for the model folder ``model``."""
        results = evaluate_tasks(model, list(self.tasks), self.task_data and Path(self.task_data), self.limit,
                                 device=device, dtype=dtype, batch_size=self.batch_size, bos=bos)
        return {**self.settings(), "results": results}


def headline_metric(metrics: dict) -> tuple[str, float] | None:
    """The metric a table shows for a task: acc_norm, else acc, else the first number lm-eval gave."""
    for key in ("acc_norm", "acc", *metrics):
        if key in metrics and _is_metric(key):
            return key, metrics[key]
    return None


def _is_metric(key: str) -> bool:
    return not key.endswith("_stderr") and key not in RUN_KEYS and key != "n"


def describe_results(results: dict[str, dict]) -> list[tuple[str, str]]:
    """``[(task, "acc 0.6100 ± 0.0114, acc_norm 0.6200 ± 0.0113 (1838 items)")]`` for reports."""
    rows = []
    for task, metrics in results.items():
        parts = [f"{key} {value:.4f}" + (f" ± {metrics[key + '_stderr']:.4f}"
                                         if isinstance(metrics.get(key + "_stderr"), (int, float)) else "")
                 for key, value in metrics.items()
                 if _is_metric(key)]
        rows.append((task, ", ".join(parts) + (f" ({metrics['n']} items)" if "n" in metrics else "")))
    return rows


# --------------------------------------------------------------------------- evaluation
def _check_output_types(loaded: dict) -> None:
    """Refuse generative tasks before any model work."""
    from reconstruct.evaluation.lm_eval_model import GENERATION_REFUSAL

    generative = sorted(name for name, task in loaded["tasks"].items() if task.OUTPUT_TYPE not in LOGLIKELIHOOD_TYPES)
    if generative:
        raise ValueError(f"--tasks {', '.join(generative)}: {GENERATION_REFUSAL}")


def load_tasks(manager, specs: list, names: list[str]) -> dict:
    """``manager.load(specs)`` (lm-eval's tasks, their data read); data errors as a ``ValueError`` naming --task-data."""
    try:
        return manager.load(specs)
    except (ValueError, KeyError, TypeError):
        raise
    except Exception as error:  # datasets' errors (offline hub, missing files) have no common base
        raise ValueError(f"--tasks {','.join(names)}: lm-eval could not load the task data ({type(error).__name__}: "
                         f"{error}); for offline use put a local copy in --task-data DIR/<task>/") from error


def top_level(loaded: dict) -> list:
    """The loaded tasks and groups that are no group's member: what ``simple_evaluate`` is handed back."""
    members = {name for children in loaded["group_map"].values() for name in children}
    return ([group for name, group in loaded["groups"].items() if name not in members]
            + [task for name, task in loaded["tasks"].items() if name not in members])


def metric_table(results: dict) -> dict[str, dict]:
    """lm-eval's ``results`` as ``{task: {metric: value, ..., "n": items}}`` (``acc,none`` → ``acc``)."""
    table: dict[str, dict] = {}
    counts = results.get("n-samples", {})
    for task, metrics in results["results"].items():
        row = {}
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or key in SKIPPED_RESULT_KEYS:
                continue
            metric, _, filter_name = key.partition(",")
            row[metric if filter_name in ("", "none") else f"{metric}/{filter_name}"] = value
        if task in counts:
            row["n"] = int(counts[task]["effective"])
        table[task] = row
    return table


def run_lm_eval(build_model, tasks: list[str], task_data: Path | None = None, limit: int | None = None,
                log_samples: bool = False) -> tuple[dict, object]:
    """lm-eval's ``simple_evaluate`` output for ``tasks`` (local data from ``task_data``) on ``build_model()``, and the model.

    The tasks are loaded and checked (generative ones refused) before ``build_model`` (any lm-eval
    ``LM``; it may load the model) is called.
    """
    lm_eval = require_lm_eval()
    from lm_eval.tasks import TaskManager

    manager = TaskManager()
    with tempfile.TemporaryDirectory(prefix="reconstruct-tasks-") as scratch:
        loaded = load_tasks(manager, task_specs(tasks, task_data, manager, Path(scratch)), tasks)
        _check_output_types(loaded)
        model = build_model()
        output = lm_eval.simple_evaluate(model=model, tasks=top_level(loaded), limit=limit,
                                         log_samples=log_samples, task_manager=manager)
    return output, model


def evaluate_tasks(
    model: str,
    tasks: list[str],
    task_data: Path | None = None,
    limit: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 1,
    stream: bool | None = None,
    bos: str = "auto",
) -> dict[str, dict]:
    """Zero-shot metrics per task from lm-eval's task definitions.

    Args:
        model: folder, .gguf, alias or hub id.
        tasks: task, group or tag names lm-eval knows, or custom tasks in ``task_data``.
        task_data: folder with a ``<task>/`` sub-folder of local data per task (``task_data.py``).
        limit: score only the first ``limit`` items of each task.
        batch_size: sequences per forward.
        stream: run the model one block at a time (None: when it does not fit in memory).
        bos: ``--calib-bos``: ``auto`` (a BOS first when the tokenizer adds one), ``always`` or ``never``.

    Returns:
        ``{task: {metric: value, "n", "seconds", "streamed", "bos_id", "max_length"}}``: lm-eval's
        metrics (``acc``, ``acc_stderr``, ``acc_norm``, ...), ``n`` items; ``seconds`` is the whole
        evaluation (all tasks run together), the same on every row.

    Raises:
        ValueError: lm-eval missing, an unknown task, a generative task, unusable local data.
    """
    if not tasks:
        raise ValueError("--tasks is empty; name at least one task, e.g. --tasks piqa")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1; got {limit}")
    require_lm_eval()
    from transformers import AutoTokenizer

    from reconstruct.evaluation.lm_eval_model import ReconstructLM

    folder = resolve_model(model)
    torch_device = resolve_device(device)
    torch_dtype = model_dtype(dtype, torch_device, load_config(folder))  # --dtype auto: as every command reads it
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    framing = resolve_framing(tokenizer, bos)
    output, model_lm = run_lm_eval(
        lambda: ReconstructLM(open_lm(folder, torch_device, torch_dtype, stream), tokenizer, framing, batch_size),
        tasks, task_data, limit)
    seconds = time.perf_counter() - started
    shared = {"seconds": seconds, "streamed": model_lm.lm.streamed, **framing.record(), "max_length": model_lm.max_length}
    table = {task: {**row, **shared} for task, row in metric_table(output).items()}
    for task, row in table.items():
        logger.info("%s: %s", task, ", ".join(f"{key} {value:.4f}" for key, value in row.items()
                                                 if key in ("acc", "acc_norm", "word_perplexity")))
    return table
