"""``reconstruct sweep``: a grid of pruner × pattern × sparsity × method, each cell a normal job.

Every cell is ``reconstruct run ... --out DIR/<cell> --eval DATA`` in a child process: the cell is a
resumable job like any other (kill the sweep, run it again, and the cell in flight resumes), and its
peak RSS in ``reconstruct.json`` is its own, not the sweep's. A cell whose job is finished, whose
``reconstruct.json`` holds the requested evaluation and whose command line has not changed is
skipped without starting a process; anything else goes to the child, which resumes the job, refuses
a changed one, or only adds the evaluation. The dense pass is not shared between cells: each cell
computes its own dense targets (the price of cells being independent, resumable jobs).

Results: ``DIR/sweep.csv`` and ``DIR/sweep.md`` (a dense row first, then one row per cell; with
``--eval-tasks`` a column per task, its headline metric: acc_norm, else acc) and ``DIR/sweep.png``
(perplexity vs sparsity, one line per method, one panel per pruner; patterns other than unstructured,
such as 2:4, dashed). The dense row is ``reconstruct eval`` of the unpruned model on the same windows,
run once in a child process and kept in ``DIR/dense.json`` with its command (perplexity only).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pruners.pattern import N_OF_M, UNSTRUCTURED, SparsityPattern
from pruners.registry import PRUNER_NAMES
from reconstruct.atomic import atomic_write_json
from reconstruct.config import BOS, DEVICE, DTYPE, MODEL, EvalSpec, JobConfig
from reconstruct.flags import REQUIRED, flag, flag_name
from reconstruct.methods.spec import DENSE_MERGE_MESSAGE, METHOD_NAMES
from reconstruct.modelio.facts import check_calib_seq_len, check_model_files, model_config, resolve_eval_seq_len
from reconstruct.modelio.output import REPORT_NAME
from reconstruct.jobs.finish import evaluation_settings
from reconstruct.reporting.sweep import COLUMNS, DENSE_CELL, DENSE_NAME, task_columns, write_results
from reconstruct.state.manifest import Manifest

logger = logging.getLogger(__name__)

CELLS_NAME = "sweep-cells.json"  # cell → the command line it was run with
# run flags eval shares (eval's --batch-size is its own flag, of the same name)
DENSE_FLAGS = (MODEL.name, DEVICE.name, DTYPE.name, flag_name(JobConfig, "micro_batch"), BOS.name)


@dataclass(frozen=True)
class Cell:
    """One point of the grid."""

    pruner: str
    pattern: str  # "unstructured", "N:M", or another --pattern of run (e.g. "heads")
    sparsity: float  # target sparsity (implied by N:M)
    method: str

    @property
    def implied_sparsity(self) -> bool:
        """True for N:M: the pattern fixes the sparsity (no --sparsity flag)."""
        return ":" in self.pattern

    @property
    def name(self) -> str:
        """Folder name: ``wanda-s0.5-bias-ln``, ``sparsegpt-2of4-masklora``, ``wanda-heads-s0.25-none``."""
        if self.implied_sparsity:
            shape = self.pattern.replace(":", "of")
        elif self.pattern == UNSTRUCTURED:
            shape = f"s{self.sparsity:g}"
        else:
            shape = f"{self.pattern}-s{self.sparsity:g}"
        return f"{self.pruner}-{shape}-{self.method}"


@dataclass(frozen=True)
class SweepSpec:
    """The grid and what every cell shares (the grid's flags: comma-separated lists)."""

    # the sweep folder; cell jobs go to out/<cell>
    out: Path = flag(REQUIRED, "--out", "Sweep folder: cells go to OUT/<cell>, results to OUT/sweep.{md,csv,png}.")
    pruners: tuple[str, ...] = flag(REQUIRED, "--pruner", f"Pruners, comma-separated: {', '.join(PRUNER_NAMES)}.",
                                    cli_type=str, cli_default="wanda")
    # "unstructured" and/or N:M
    patterns: tuple[str, ...] = flag(REQUIRED, "--pattern", "Patterns, comma-separated: unstructured and/or N:M such "
                                     "as 2:4 (N:M implies its sparsity).", cli_type=str, cli_default="unstructured")
    # used by the unstructured pattern; N:M implies its own
    sparsities: tuple[float, ...] = flag(REQUIRED, "--sparsity", "Sparsities for the unstructured pattern, "
                                         "comma-separated, e.g. 0.5,0.6,0.7.", cli_type=str, cli_default="0.5")
    methods: tuple[str, ...] = flag(REQUIRED, "--method", "Reconstruction methods, comma-separated, e.g. "
                                    "none,bias-ln,masklora.", cli_type=str, cli_default="none,bias-ln,masklora")
    # its data: the flag; the window length and count: EvalSpec's own flags
    evaluation: EvalSpec = flag(REQUIRED, "--eval", "Perplexity test text for every cell (.txt/.jsonl file or "
                                "wikitext2, c4, ptb).", cli_type=str)
    run_flags: tuple[str, ...] = field(default_factory=tuple)  # shared `reconstruct run` flags (model, calibration, device, ...)
    task_evaluation: object | None = None  # evaluation.tasks.TaskEvalSpec: --eval-tasks in every cell, a column per task


def build_cells(spec: SweepSpec, mask_scope: str = "row") -> list[Cell]:
    """The grid in order (pruner, pattern, sparsity, method); N:M patterns imply their sparsity.

    Raises:
        ValueError: for a bad pattern or sparsity, naming the flag.
    """
    if not (spec.pruners and spec.patterns and spec.methods):
        raise ValueError("--pruner, --pattern and --method each need at least one value")
    for pruner in spec.pruners:
        if pruner not in PRUNER_NAMES:
            raise ValueError(f"--pruner {pruner!r} is not one of {', '.join(PRUNER_NAMES)}")
    for method in spec.methods:
        if method not in (*METHOD_NAMES, "auto"):
            raise ValueError(f"--method {method!r} is not one of auto, {', '.join(METHOD_NAMES)}")
    if "lora" in spec.methods and "--allow-dense-merge" not in spec.run_flags:
        raise ValueError(DENSE_MERGE_MESSAGE)
    cells = []
    for pruner in spec.pruners:
        for pattern in spec.patterns:
            parsed = SparsityPattern.parse(pattern, None, mask_scope)  # a bad --pattern fails here
            if parsed.kind == N_OF_M:
                shapes = [(pattern, parsed.sparsity)]
            else:
                if not spec.sparsities:
                    raise ValueError(f"--sparsity needs at least one value for --pattern {pattern}")
                shapes = [(pattern, SparsityPattern.parse(pattern, s, mask_scope).sparsity) for s in spec.sparsities]
            for shape, sparsity in shapes:
                for method in spec.methods:
                    cells.append(Cell(pruner, shape, sparsity, method))
    names = [cell.name for cell in cells]
    if len(set(names)) != len(names):
        raise ValueError("the grid repeats a cell; list each pruner, pattern, sparsity and method once")
    return cells


def checked_spec(spec: SweepSpec, mask_scope: str, model: str, seq_len: int) -> SweepSpec:
    """Check the grid, then its length flags against ``model``, before any cell runs.

    Args:
        spec: The sweep; an evaluation ``seq_len`` of None becomes min(2048, the model's context).
        mask_scope: The cells' ``--mask-scope``.
        model: ``--model`` as given.
        seq_len: The cells' calibration ``--seq-len``.

    Returns:
        ``spec`` with its evaluation window resolved.

    Raises:
        ValueError: one line naming the flag at fault (for lengths: and the model's context length).
    """
    build_cells(spec, mask_scope)  # a bad grid is refused before the model is read
    config = model_config(model)
    check_model_files(model)  # a damaged weights file: one line now, not one per cell
    check_calib_seq_len(seq_len, config)
    window = resolve_eval_seq_len(spec.evaluation.seq_len, config, "--max-length")
    return dataclasses.replace(spec, evaluation=dataclasses.replace(spec.evaluation, seq_len=window))


def cell_command(spec: SweepSpec, cell: Cell) -> list[str]:
    """The ``reconstruct run`` arguments of one cell (without the program name)."""
    args = ["run", "--pruner", cell.pruner, "--pattern", cell.pattern, "--method", cell.method]
    if not cell.implied_sparsity:
        args += ["--sparsity", f"{cell.sparsity:g}"]
    evaluation = spec.evaluation
    args += ["--eval", evaluation.data]
    if evaluation.seq_len is not None:  # None: the cell's default, min(2048, the model's context)
        args += ["--max-length", str(evaluation.seq_len)]
    tasks = spec.task_evaluation
    limit = evaluation.max_windows if evaluation.max_windows is not None else tasks and tasks.limit
    if limit is not None:
        args += ["--limit", str(limit)]  # perplexity windows and items per task: one flag, as `run` reads it
    if tasks is not None:
        args += ["--eval-tasks", ",".join(tasks.tasks)]
        if tasks.task_data is not None:
            args += ["--task-data", tasks.settings()["task_data"]]
    return [*args, *spec.run_flags, "--out", str(spec.out / cell.name)]


def is_done(spec: SweepSpec, cell: Cell, command: list[str], recorded: dict) -> bool:
    """True when the cell's job is finished, evaluated as asked, and was run with this command."""
    out = spec.out / cell.name
    try:
        manifest = Manifest.load(out)
    except ValueError:
        return False
    if manifest is None or not manifest.finished or recorded.get(cell.name) != command:
        return False
    report_path = out / REPORT_NAME
    if not report_path.is_file():
        return False
    report = json.loads(report_path.read_text())
    evaluation = report.get("evaluation") or {}
    settings = evaluation_settings(spec.evaluation)
    if spec.task_evaluation is not None:
        recorded_tasks = report.get("task_evaluation") or {}
        task_settings = spec.task_evaluation.settings()
        if {key: recorded_tasks.get(key) for key in task_settings} != task_settings:
            return False
    return {key: evaluation.get(key) for key in settings} == settings and "perplexity" in evaluation


def run_cell(command: list[str]) -> None:
    """Run one cell's job in a child process (its own peak memory, like any ``reconstruct run``)."""
    completed = subprocess.run([sys.executable, "-m", "reconstruct", *command])
    if completed.returncode != 0:
        raise ValueError(
            f"sweep cell {Path(command[-1]).name} failed (exit code {completed.returncode}): "
            f"reconstruct {' '.join(command)}; fix the cause and run the sweep again (finished cells are kept)"
        )


def cell_row(spec: SweepSpec, cell: Cell) -> dict:
    """One results row from the cell's ``reconstruct.json``."""
    report = json.loads((spec.out / cell.name / REPORT_NAME).read_text())
    blocks = report.get("blocks", [])
    evaluation = report.get("evaluation") or {}
    trainable = sum(block.get("trainable_params", 0) for block in blocks)
    block_params = sum(block.get("block_params", 0) for block in blocks)
    return {
        "cell": cell.name,
        "pruner": cell.pruner,
        "pattern": cell.pattern,
        "sparsity": cell.sparsity,
        "method": cell.method,
        "perplexity": evaluation.get("perplexity"),
        "achieved_sparsity": report.get("mean_linear_sparsity"),
        "time_s": report.get("elapsed_seconds"),
        "peak_rss_mb": report.get("peak_rss_mb"),
        "peak_gpu_mb": report.get("peak_gpu_mb"),
        "trainable_share": trainable / block_params if block_params else 0.0,
        "eval_seconds": evaluation.get("seconds"),
        **task_columns(report.get("task_evaluation")),
    }


def dense_command(spec: SweepSpec) -> list[str]:
    """The ``reconstruct eval`` arguments that score the unpruned model on the cells' windows."""
    evaluation = spec.evaluation
    args = ["eval", "--data", evaluation.data]
    if evaluation.seq_len is not None:
        args += ["--max-length", str(evaluation.seq_len)]
    if evaluation.max_windows is not None:
        args += ["--limit", str(evaluation.max_windows)]
    flags = list(spec.run_flags)
    for index, name in enumerate(flags[:-1]):
        if name in DENSE_FLAGS:
            args += [name, flags[index + 1]]
    return args


def run_dense(command: list[str]) -> dict:
    """Run ``reconstruct eval`` in a child process; its JSON result (perplexity, seconds, ...)."""
    completed = subprocess.run([sys.executable, "-m", "reconstruct", *command], stdout=subprocess.PIPE, text=True)
    if completed.returncode != 0:
        raise ValueError(f"the dense evaluation failed (exit code {completed.returncode}): reconstruct "
                         f"{' '.join(command)}; fix the cause and run the sweep again (finished cells are kept)")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def dense_row(spec: SweepSpec) -> dict:
    """The dense model's row: evaluated once, then read from ``DIR/dense.json`` while the command is the same."""
    command = dense_command(spec)
    path = spec.out / DENSE_NAME
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    if recorded.get("command") != command:
        logger.info("dense model: reconstruct %s", " ".join(command))
        recorded = {"command": command, "result": run_dense(command)}
        atomic_write_json(path, recorded)
    result = recorded["result"]
    return {**{key: None for key in COLUMNS}, "cell": DENSE_CELL, "pruner": "-", "pattern": "-", "sparsity": 0.0,
            "method": "-", "perplexity": result.get("perplexity"), "achieved_sparsity": 0.0,
            "trainable_share": 0.0, "eval_seconds": result.get("seconds")}


def run_sweep(spec: SweepSpec, mask_scope: str = "row") -> list[dict]:
    """Run (or resume) every cell, then write ``sweep.csv``, ``sweep.md`` and ``sweep.png``.

    Returns:
        The rows, one per cell, in grid order; the dense model's row first.
    """
    cells = build_cells(spec, mask_scope)
    spec.out.mkdir(parents=True, exist_ok=True)
    cells_path = spec.out / CELLS_NAME
    recorded = json.loads(cells_path.read_text()) if cells_path.is_file() else {}
    for number, cell in enumerate(cells, 1):
        command = cell_command(spec, cell)
        if is_done(spec, cell, command, recorded):
            logger.info("cell %d/%d %s: finished and evaluated; skipped", number, len(cells), cell.name)
            continue
        logger.info("cell %d/%d %s: reconstruct %s", number, len(cells), cell.name, " ".join(command))
        run_cell(command)
        recorded[cell.name] = command
        atomic_write_json(cells_path, recorded)
    rows = [dense_row(spec), *(cell_row(spec, cell) for cell in cells)]
    write_results(spec, rows)
    return rows
