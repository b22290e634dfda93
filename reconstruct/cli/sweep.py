"""``reconstruct sweep``: a grid of ``run`` jobs, each evaluated, tabulated (``reconstruct.jobs.sweep``)."""

from __future__ import annotations

import typer

from pruners.pattern import SparsityPattern
from reconstruct.cli.main import app, setup_logging
from reconstruct.cli.errors import guarded
from reconstruct.cli.job_options import CALIB, EVALUATION, MACHINE, MODEL, PRUNE, RECON, SCOPE, SWEEP_SHARED, pick
from reconstruct.cli.options import PROCESS, command, command_line, spec_options, values
from reconstruct.config import CalibSpec, EvalSpec, JobConfig
from reconstruct.evaluation.tasks import TaskEvalSpec
from reconstruct.flags import flag_name
from reconstruct.jobs.sweep import SweepSpec, checked_spec, run_sweep
from reconstruct.state.out_folder import check_out_folder

GRID = spec_options(SweepSpec, "evaluation", "out", "pruners", "sparsities", "patterns", "methods")
LENGTHS = tuple(option for option in EVALUATION if option.spec is not EvalSpec or option.field != "data")
SWEEP = (*GRID, *LENGTHS, *MODEL, *SCOPE, *RECON, *CALIB, *PRUNE, *MACHINE, *PROCESS)


def _split(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def sweep_spec(params: dict) -> SweepSpec:
    """The grid of the comma-separated flags, with what every cell shares (``run``'s other flags)."""
    grid = values(SweepSpec, params, GRID)
    try:
        sparsities = tuple(float(value) for value in _split(grid["sparsities"]))
    except ValueError:
        raise ValueError(f"{flag_name(SweepSpec, 'sparsities')} must be comma-separated numbers such as 0.5,0.6; "
                         f"got {grid['sparsities']!r}") from None
    lengths, tasks = values(EvalSpec, params, LENGTHS), values(TaskEvalSpec, params, LENGTHS)
    return SweepSpec(
        out=grid["out"], pruners=_split(grid["pruners"]), patterns=_split(grid["patterns"]), sparsities=sparsities,
        methods=_split(grid["methods"]), evaluation=EvalSpec(grid["evaluation"], **lengths),
        run_flags=tuple(command_line(SWEEP_SHARED, params)),
        task_evaluation=TaskEvalSpec.from_flags(tasks.get("tasks"), tasks.get("task_data"), lengths.get("max_windows")),
    )


@command(app, "sweep", SWEEP)
def sweep(params: dict) -> None:
    """Run a grid of pruner × pattern × sparsity × method (each cell a resumable job), evaluate each, and tabulate."""
    setup_logging(params["verbose"])
    out = values(SweepSpec, params, GRID)["out"]

    def run_grid():

        check_out_folder(out)
        mask_scope = pick(SparsityPattern, params)["scope"]
        spec = checked_spec(sweep_spec(params), mask_scope, pick(JobConfig, params)["model"],
                            pick(CalibSpec, params)["seq_len"])
        rows = run_sweep(spec, mask_scope)
        typer.echo(f"wrote {out / 'sweep.md'}, sweep.csv and sweep.png ({len(rows) - 1} cells and the dense model)")

    guarded(run_grid, out=out)
