"""The flags of `run`, `plan` and `sweep` come from the specs' fields; the --nproc command line round-trips."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from reconstruct.cli import app, parse_args
from reconstruct.cli.job_options import OUTPUT, PLAN, RUN, SWEEP_SHARED, build_job, relaunch_command
from reconstruct.cli.options import PROCESS
from reconstruct.cli.sweep import GRID, LENGTHS, SWEEP
from reconstruct.flags import flag_of


def _names(options) -> set[str]:
    return {option.flag.name for option in options}


def test_every_flag_of_run_is_a_spec_field_or_the_command_lines_own():
    assert len(_names(RUN)) == len(RUN)  # one option per flag name
    assert [option for option in RUN if option.spec is None] == list(PROCESS)  # --nproc, --verbose
    for option in RUN:
        if option.spec is not None and not option.flag.name.startswith("--retrain-"):
            assert flag_of(option.spec, option.field).name == option.flag.name, option


def test_plan_and_sweep_take_the_flags_of_run_they_need():
    assert _names(PLAN) == _names(RUN) - _names(OUTPUT)
    assert _names(SWEEP) - _names(GRID) - _names(LENGTHS) == _names(SWEEP_SHARED)
    assert _names(SWEEP_SHARED) <= _names(RUN)


def test_the_relaunch_command_line_builds_the_same_job(monkeypatch, tmp_path):
    params = parse_args("run", [
        "--pruner", "sparsegpt", "--sparsity", "0.7", "--method", "scalelora", "--no-recon-guard", "--lr", "0.001",
        "--granularity", "sublayer", "--track-error", "--mask-scope", "layer", "--cycles", "2", "--n-samples", "4",
        "--seq-len", "16", "--calib-bos", "never", "--model", str(tmp_path / "m"), "--device", "cpu",
        "--dtype", "float32", "--out", str(tmp_path / "o"), "--force", "--nproc", "4",
    ])
    seen = []
    monkeypatch.setattr("reconstruct.cli.run.run_job", lambda job, budget: seen.append(job) or {})
    args = relaunch_command(params)
    assert "--nproc" not in args and "--no-recon-guard" in args
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen == [build_job(params)]
    assert seen[0].out == Path(tmp_path / "o") and seen[0].recon.method == "scalelora"


def test_a_flag_declared_on_a_spec_field_reaches_the_job_and_the_sweep_cells():
    params = parse_args("run", ["--pruner", "sparsegpt", "--percdamp", "0.05", "--out", "o"])
    assert build_job(params).prune.percdamp == 0.05
    args = relaunch_command(params)
    assert args[args.index("--percdamp") + 1] == "0.05"
