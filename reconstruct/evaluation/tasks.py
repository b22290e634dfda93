"""Zero-shot tasks with lm-evaluation-harness's own task definitions, on the model in memory or streamed.

``evaluate_tasks`` runs any task, group or tag name lm-eval's registry knows through
``simple_evaluate`` with ``ReconstructLM`` (``lm_eval_model.py``) as the model, so a model larger
than the GPU is scored block by block. lm-eval is an optional extra (``pip install -e ".[eval]"``);
without it ``--tasks`` fails with one line naming the extra.

Local data (``--task-data DIR``, for offline use): for each requested name, ``DIR/<name>/`` may hold

- an lm-eval task YAML (a custom task: ``dataset_path: json`` with ``data_files`` relative to the
  YAML's folder), used as it is; or
- data files for a task lm-eval knows, in that task's dataset schema: ``train``, ``validation``
  (or ``valid`` / ``dev``) and ``test`` as ``.jsonl`` / ``.json``; the registered task's own prompt,
  choices and metrics are kept, only its dataset is replaced by the files (lm-eval's ``dataset_path:
  json`` with ``data_files``). A ``<stem>-labels.lst`` beside ``<stem>.jsonl`` (PIQA's release format:
  ``valid.jsonl`` + ``valid-labels.lst``) supplies each row's ``label``.

Names without a ``DIR/<name>/`` folder load lm-eval's data as usual (the Hugging Face hub).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from calib.framing import resolve_framing

logger = logging.getLogger(__name__)

EXTRA_HINT = 'install the eval extra: pip install -e ".[eval]" (or pip install "reconstruct[eval]")'
SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation",
                 "test": "test"}  # local file stem -> the split name lm-eval's task configs use
DATA_SUFFIXES = (".jsonl", ".json")
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
SKIPPED_RESULT_KEYS = ("sample_len",)  # lm-eval's item count before --limit; "n" is the count scored
TASK_BATCH = 8  # --eval-tasks: sequences per forward (run passes its --micro-batch)
RUN_KEYS = ("seconds", "streamed", "bos_id", "max_length")  # evaluate_tasks' own entries beside lm-eval's metrics
LOGLIKELIHOOD_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice")


def require_lm_eval():
    """The ``lm_eval`` module, or a ``ValueError`` naming the extra that installs it."""
    try:
        import lm_eval
    except ImportError:
        raise ValueError(f"--tasks needs lm-evaluation-harness (lm-eval), which is not installed: {EXTRA_HINT}") from None
    return lm_eval


def parse_task_names(text: str | None) -> list[str]:
    """``"piqa, arc_easy"`` → ``["piqa", "arc_easy"]`` (empty for None or blank)."""
    return [name.strip() for name in (text or "").split(",") if name.strip()]


@dataclass(frozen=True)
class TaskEvalSpec:
    """Zero-shot tasks on a finished output (``run --eval-tasks``, ``retrain --eval-tasks``)."""

    tasks: tuple[str, ...]  # lm-eval task, group or tag names (or custom tasks in task_data)
    task_data: str | None = None  # --task-data: local data, DIR/<task>/
    limit: int | None = None  # --eval-limit: only the first items of each task (None: all)
    batch_size: int = TASK_BATCH  # sequences per forward

    def __post_init__(self) -> None:
        # Checked when the job is built, not hours later when the evaluation starts.
        if not self.tasks:
            raise ValueError("--eval-tasks is empty; name at least one task, e.g. --eval-tasks piqa")
        if importlib.util.find_spec("lm_eval") is None:
            raise ValueError(f"--eval-tasks needs lm-evaluation-harness (lm-eval), which is not installed: {EXTRA_HINT}")
        if self.task_data is not None and not Path(self.task_data).expanduser().is_dir():
            raise ValueError(f"--task-data {self.task_data}: no such folder")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--eval-limit must be at least 1; got {self.limit}")

    @classmethod
    def from_flags(cls, tasks: str | None, task_data: Path | str | None, limit: int | None,
                   batch_size: int | None = None) -> TaskEvalSpec | None:
        """The spec of ``--eval-tasks A,B --task-data DIR --eval-limit N`` (None without ``--eval-tasks``)."""
        if tasks is None:
            if task_data is not None or limit is not None:
                raise ValueError("--task-data and --eval-limit only apply with --eval-tasks")
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


# --------------------------------------------------------------------------- local data
def _local_splits(folder: Path, scratch: Path) -> dict[str, str]:
    """``{split: file}`` for the data files in ``folder`` (labels files merged into a copy in ``scratch``)."""
    files: dict[str, str] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix not in DATA_SUFFIXES or path.stem not in SPLIT_ALIASES:
            continue
        split = SPLIT_ALIASES[path.stem]
        if split in files:
            raise ValueError(f"--task-data {folder}: two files for the {split} split ({Path(files[split]).name}, {path.name})")
        labels = path.with_name(f"{path.stem}-labels.lst")
        files[split] = str(_with_labels(path, labels, scratch / folder.name) if labels.is_file() else path)
    return files


def _with_labels(rows_path: Path, labels_path: Path, scratch: Path) -> Path:
    """A copy of ``rows_path`` (JSON lines) with each row's ``label`` from ``labels_path`` (one per line)."""
    rows = [json.loads(line) for line in rows_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    labels = [int(label) for label in labels_path.read_text().split()]
    if len(rows) != len(labels):
        raise ValueError(f"--task-data {rows_path.parent}: {len(rows)} rows in {rows_path.name} "
                         f"but {len(labels)} labels in {labels_path.name}")
    scratch.mkdir(parents=True, exist_ok=True)
    merged = scratch / f"{rows_path.stem}.jsonl"
    merged.write_text("".join(json.dumps({**row, "label": label}) + "\n" for row, label in zip(rows, labels)),
                      encoding="utf-8")
    return merged


def _custom_task_config(yaml_path: Path, name: str, scratch: Path) -> dict:
    """A custom task's YAML as lm-eval reads it, its relative ``data_files`` made relative to the YAML."""
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(yaml_path, resolve_func=True)
    if config.get("task") != name:
        raise ValueError(f"--task-data: {yaml_path} defines task {config.get('task')!r}, not {name!r}; "
                         f"name the folder after the task")
    kwargs = dict(config.get("dataset_kwargs") or {})
    data_files = kwargs.get("data_files")
    if isinstance(data_files, dict):
        kwargs["data_files"] = {split: _beside(yaml_path, files) for split, files in data_files.items()}
    elif data_files is not None:
        kwargs["data_files"] = _beside(yaml_path, data_files)
    kwargs.setdefault("cache_dir", str(scratch / "datasets"))
    return {**config, "dataset_kwargs": kwargs}


def _beside(yaml_path: Path, files):
    if isinstance(files, list):
        return [_beside(yaml_path, one) for one in files]
    path = Path(files).expanduser()
    return str(path if path.is_absolute() else yaml_path.parent / path)


def _registered_task_config(manager, name: str, folder: Path, scratch: Path) -> dict:
    """lm-eval's config of task ``name`` with its dataset replaced by the files in ``folder``."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(name)
    if entry is None or entry.yaml_path is None or entry.kind.name != "TASK":
        raise ValueError(f"--task-data {folder}: lm-eval has no single YAML task {name!r} to give these files to; "
                         f"put a task YAML (lm-eval's format) in {folder}")
    files = _local_splits(folder, scratch)
    config = load_yaml(entry.yaml_path, resolve_func=True)
    for key in SPLIT_KEYS:  # splits without a local file are dropped (zero-shot needs only the evaluated one)
        if config.get(key) is not None and config[key] not in files:
            config[key] = None
    if config.get("test_split") is None and config.get("validation_split") is None:
        wanted = sorted({entry for entry in (load_yaml(entry.yaml_path).get(key) for key in ("test_split", "validation_split")) if entry})
        raise ValueError(f"--task-data {folder}: task {name} evaluates on its {' or '.join(wanted)} split; "
                         f"add {wanted[0]}.jsonl (rows in the task's dataset schema) there")
    return {**config, "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": files, "cache_dir": str(scratch / "datasets")}}


def _task_folder(task_data: Path | None, name: str) -> Path | None:
    """``DIR/<name>``, or ``DIR`` itself when it is named after the task (``--task-data data/piqa``)."""
    if task_data is None:
        return None
    task_data = Path(task_data).expanduser()
    return task_data if task_data.name == name and not (task_data / name).is_dir() else task_data / name


def task_specs(names: list[str], task_data: Path | None, manager, scratch: Path) -> list:
    """What ``simple_evaluate`` gets for each name: the name itself, or a config pointing at local data."""
    specs = []
    for name in names:
        folder = _task_folder(task_data, name)
        if folder is None or not folder.is_dir():
            if name not in manager.all_tasks:
                raise ValueError(f"--tasks {name}: not a task, group or tag lm-eval knows"
                                 + (f", and no folder {folder} with its data" if folder is not None else "")
                                 + " (see `lm-eval ls tasks`)")
            specs.append(name)
            continue
        yamls = sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml"))
        if len(yamls) > 1:
            raise ValueError(f"--task-data {folder}: {len(yamls)} YAML files; keep one task YAML per folder")
        specs.append(_custom_task_config(yamls[0], name, scratch) if yamls
                     else _registered_task_config(manager, name, folder, scratch))
        logger.info("%s: data from %s", name, folder)
    return specs


# --------------------------------------------------------------------------- evaluation
def _check_output_types(loaded: dict) -> None:
    """Refuse generative tasks before any model work."""
    from reconstruct.evaluation.lm_eval_model import GENERATION_REFUSAL

    generative = sorted(name for name, task in loaded["tasks"].items() if task.OUTPUT_TYPE not in LOGLIKELIHOOD_TYPES)
    if generative:
        raise ValueError(f"--tasks {', '.join(generative)}: {GENERATION_REFUSAL}")


def _load_tasks(manager, specs: list, names: list[str]) -> dict:
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
        loaded = _load_tasks(manager, task_specs(tasks, task_data, manager, Path(scratch)), tasks)
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
        task_data: folder with a ``<task>/`` sub-folder of local data per task (module docstring).
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
    from reconstruct.evaluation.streaming import open_lm
    from reconstruct.modelio.source import resolve_model
    from reconstruct.runtime import resolve_device, resolve_dtype

    folder = resolve_model(model)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device, None)
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
