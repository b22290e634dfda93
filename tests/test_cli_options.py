"""The flags of `run` as option groups: every flag in one group, and the --nproc command line round-trips."""

from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path

from typer.testing import CliRunner

import cli

GROUPS = (cli.ShapeOptions, cli.ReconOptions, cli.PruneOptions, cli.CalibOptions, cli.MachineOptions,
          cli.OutputOptions, cli.ProcessOptions, cli.RetrainStageOptions)


def _names(*groups) -> list[str]:
    return [item.name for group in groups for item in fields(group)]


def test_every_flag_of_run_is_in_exactly_one_group():
    names = _names(*GROUPS)
    assert len(names) == len(set(names))
    assert set(names) == set(inspect.signature(cli.run).parameters) - {"ctx"}


def test_plan_and_sweep_take_the_flags_of_their_groups():
    group_of = {item.name: item.default_factory for item in fields(cli.RunOptions)}
    plan = set(inspect.signature(cli.plan).parameters) - {"ctx", "config"}
    assert plan == set(_names(*(group_of[name] for name in cli.PLAN_GROUPS)))
    sweep_own = {"eval_data", "out", "pruner", "sparsity", "pattern", "method", "max_length", "limit",
                 "eval_tasks", "task_data"}
    sweep = set(inspect.signature(cli.sweep).parameters) - {"ctx"} - sweep_own
    assert sweep == set(_names(*(group_of[name] for name in cli.SWEEP_GROUPS)))


def test_the_relaunch_command_line_builds_the_same_job(monkeypatch, tmp_path):
    options = cli.RunOptions(
        shape=cli.ShapeOptions(pruner=cli.PrunerName.sparsegpt, sparsity=0.7, method=cli.MethodName.scalelora),
        recon=cli.ReconOptions(recon_guard=False, lr=0.001, granularity=cli.Granularity.sublayer, track_error=True),
        prune=cli.PruneOptions(mask_scope=cli.MaskScope.layer, cycles=2),
        calib=cli.CalibOptions(n_samples=4, seq_len=16, calib_bos=cli.BosMode.never),
        machine=cli.MachineOptions(model=str(tmp_path / "m"), device="cpu", dtype=cli.Dtype.float32),
        output=cli.OutputOptions(out=tmp_path / "o", force=True),
        process=cli.ProcessOptions(nproc=4),
    )
    seen = []
    monkeypatch.setattr("cli.run_job", lambda job, budget: seen.append(job) or {})
    args = options.command_line()
    assert "--nproc" not in args and "--no-recon-guard" in args
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert seen == [cli.build_job(options)]
    assert seen[0].out == Path(tmp_path / "o") and seen[0].recon.method == "scalelora"
