"""Local task data for lm-eval (``--task-data DIR``): what ``simple_evaluate`` gets for each task name.

For each requested name, ``DIR/<name>/`` (or ``DIR`` itself when it is named after the task) may hold

- an lm-eval task YAML (a custom task: ``dataset_path: json`` with ``data_files`` relative to the
  YAML's folder), used as it is; or
- data files for a task lm-eval knows, in that task's dataset schema: ``train``, ``validation``
  (or ``valid`` / ``dev``) and ``test`` as ``.jsonl`` / ``.json``; the registered task's own prompt,
  choices and metrics are kept, only its dataset is replaced by the files (lm-eval's ``dataset_path:
  json`` with ``data_files``). A ``<stem>-labels.lst`` beside ``<stem>.jsonl`` (PIQA's release format:
  ``valid.jsonl`` + ``valid-labels.lst``) supplies each row's ``label``.

Names without such a folder stay names: lm-eval loads their data as usual (the Hugging Face hub).
``datasets`` caches what it reads under ``scratch``, which the caller deletes afterwards.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation",
                 "test": "test"}  # local file stem -> the split name lm-eval's task configs use
DATA_SUFFIXES = (".jsonl", ".json")
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


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
    evaluated = config.get("test_split") or config.get("validation_split")  # lm-eval scores test, else validation
    if evaluated not in files:  # another split in its place would silently score other items
        raise ValueError(f"--task-data {folder}: task {name} evaluates on its {evaluated} split; "
                         f"add {evaluated}.jsonl there (rows in the schema of the task's dataset)")
    for key in SPLIT_KEYS:  # other splits without a local file are dropped (zero-shot needs none of them)
        if config.get(key) is not None and config[key] not in files:
            config[key] = None
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
