"""``reconstruct sweep``: a 2 × 1 × 2 grid on a tiny model writes sweep.md/csv/png; a re-run does no work.

Cells normally run as ``python -m reconstruct run ...`` child processes; here ``run_cell`` runs the same
command line in-process (a child costs seconds of imports per cell on CI), and one test checks the
child command itself.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from reconstruct.jobs import sweep as sweep_module
from reconstruct.config import EvalSpec
from reconstruct.reporting.plots import matplotlib_available
from reconstruct.jobs.sweep import Cell, SweepSpec, build_cells, cell_command, is_done, run_cell

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DRAWS_FIGURES = True  # conftest: sweep.png is drawn in this process and checked


def sweep_args(model, calib, out) -> list[str]:
    return ["sweep", "--model", str(model), "--pruner", "wanda,sparsegpt", "--sparsity", "0.5",
            "--method", "none,bias-ln", "--recon-steps", "2", "--eval", str(calib), "--max-length", "32",
            "--limit", "3", "--calib", str(calib), "--n-samples", "8", "--seq-len", "32", "--batch-size", "4",
            "--device", "cpu", "--out", str(out)]


def dense_in_process(command: list[str]) -> dict:
    """``sweep_module.run_dense`` without a child process: ``reconstruct eval`` through the CliRunner."""
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def swept(tiny_model_dir, small_calib_file, tmp_path_factory):
    """``(out, args, commands run)`` after one sweep whose cells ran in-process."""
    out = tmp_path_factory.mktemp("sweep") / "grid"
    args = sweep_args(tiny_model_dir("llama"), small_calib_file, out)
    commands: list[list[str]] = []

    def in_process(command: list[str]) -> None:
        commands.append(command)
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 0, result.output

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sweep_module, "run_cell", in_process)
        patch.setattr(sweep_module, "run_dense", dense_in_process)
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out, args, commands


def test_grid_writes_md_csv_png(swept):
    out, _, commands = swept
    names = ["wanda-s0.5-none", "wanda-s0.5-bias-ln", "sparsegpt-s0.5-none", "sparsegpt-s0.5-bias-ln"]
    assert [command[command.index("--out") + 1] for command in commands] == [str(out / name) for name in names]
    rows = list(csv.DictReader(io.StringIO((out / "sweep.csv").read_text())))
    assert [row["cell"] for row in rows] == ["dense", *names]
    dense, rows = rows[0], rows[1:]
    assert set(rows[0]) >= {"pruner", "pattern", "sparsity", "method", "perplexity", "time_s", "peak_rss_mb", "trainable_share"}
    for row, name in zip(rows, names):
        report = json.loads((out / name / "reconstruct.json").read_text())
        # csv writes str(float), the shortest repr that reads back to the same float: exact
        assert float(row["perplexity"]) == report["evaluation"]["perplexity"]
        assert report["evaluation"]["windows"] == 3
        assert float(row["time_s"]) == report["elapsed_seconds"]
        assert float(row["peak_rss_mb"]) == report["peak_rss_mb"]
        assert (row["pattern"], float(row["sparsity"]), float(row["achieved_sparsity"])) == ("unstructured", 0.5, 0.5)
        assert (float(row["trainable_share"]) > 0) == (row["method"] == "bias-ln")
        assert (out / name / "report.md").is_file()
    markdown = (out / "sweep.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| wanda") or line.startswith("| sparsegpt")]
    assert len(table) == 4
    assert f"| {float(rows[1]['perplexity']):.3f} |" in table[1]
    dense_eval = json.loads((out / "dense.json").read_text())
    assert dense_eval["command"][:2] == ["eval", "--data"] and dense_eval["result"]["windows"] == 3
    assert float(dense["perplexity"]) == dense_eval["result"]["perplexity"] and float(dense["sparsity"]) == 0.0
    assert f"| dense | - | 0.00 | - | {float(dense['perplexity']):.3f} |" in markdown
    if matplotlib_available():
        assert (out / "sweep.png").read_bytes()[:8] == PNG_MAGIC
        assert "![perplexity vs sparsity](sweep.png)" in markdown


def test_rerun_does_no_work(swept, monkeypatch):
    out, args, _ = swept
    before = {name: (out / name).read_bytes() for name in ("sweep.csv", "sweep.md")}
    reports = {path: path.stat().st_mtime_ns for path in out.glob("*/reconstruct.json")}

    def no_work(*args, **kwargs):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(sweep_module, "run_cell", no_work)
    monkeypatch.setattr(sweep_module, "run_dense", no_work)
    monkeypatch.setattr("reconstruct.cli.run.run_job", no_work)
    monkeypatch.setattr("reconstruct.cli.evaluate.perplexity", no_work)
    monkeypatch.setattr("reconstruct.jobs.finish.perplexity", no_work)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert {name: (out / name).read_bytes() for name in before} == before
    assert {path: path.stat().st_mtime_ns for path in reports} == reports


def test_changed_command_is_not_skipped(swept):
    out, _, commands = swept
    recorded = json.loads((out / "sweep-cells.json").read_text())
    spec = SweepSpec(out=out, pruners=("wanda",), patterns=("unstructured",), sparsities=(0.5,), methods=("none",),
                     evaluation=EvalSpec(commands[0][commands[0].index("--eval") + 1], 32, 3),
                     run_flags=tuple(commands[0][commands[0].index("--limit") + 2 : commands[0].index("--out")]))
    cell = Cell("wanda", "unstructured", 0.5, "none")
    assert is_done(spec, cell, cell_command(spec, cell), recorded)
    assert not is_done(spec, cell, [*cell_command(spec, cell), "--seed", "1"], recorded)
    other_eval = dataclasses.replace(spec, evaluation=EvalSpec(spec.evaluation.data, 32, 2))
    assert not is_done(other_eval, cell, cell_command(spec, cell), recorded)


def test_cells_allow_nm_patterns():
    spec = SweepSpec(out=Path("x"), pruners=("sparsegpt",), patterns=("unstructured", "2:4"),
                     sparsities=(0.5, 0.7), methods=("none", "masklora"), evaluation=EvalSpec("wikitext2"))
    cells = build_cells(spec)
    assert [cell.name for cell in cells] == [
        "sparsegpt-s0.5-none", "sparsegpt-s0.5-masklora", "sparsegpt-s0.7-none", "sparsegpt-s0.7-masklora",
        "sparsegpt-2of4-none", "sparsegpt-2of4-masklora",
    ]
    nm = cells[-1]
    assert (nm.pattern, nm.sparsity) == ("2:4", 0.5)
    command = cell_command(spec, nm)
    assert command[:7] == ["run", "--pruner", "sparsegpt", "--pattern", "2:4", "--method", "masklora"]
    assert "--sparsity" not in command  # implied by N:M


@pytest.mark.parametrize("flags, words", [
    (["--pruner", "wanda,bogus"], ["--pruner", "bogus"]),
    (["--method", "none,nope"], ["--method", "nope"]),
    (["--sparsity", "0.5,x"], ["--sparsity"]),
    (["--sparsity", "1.5"], ["--sparsity"]),
    (["--pattern", "5:4"], ["--pattern"]),
    (["--method", "lora"], ["--allow-dense-merge"]),
    (["--eval", "missing.txt"], ["--eval", "no such file"]),
])
def test_bad_grid_is_one_clear_error(tmp_path, small_calib_file, flags, words):
    result = CliRunner().invoke(app, ["sweep", "--eval-data", str(small_calib_file), "--out", str(tmp_path / "s"), *flags])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(word in errors[0] for word in words), result.output
    assert not (tmp_path / "s").exists()


def test_run_cell_starts_a_child_reconstruct_run(monkeypatch):
    seen = []

    def fake_run(argv, **kwargs):
        seen.append(argv)
        return subprocess.CompletedProcess(argv, 2 if "fail" in argv[-1] else 0)

    monkeypatch.setattr(sweep_module.subprocess, "run", fake_run)
    run_cell(["run", "--pruner", "wanda", "--out", "grid/ok"])
    assert seen == [[sys.executable, "-m", "reconstruct", "run", "--pruner", "wanda", "--out", "grid/ok"]]
    with pytest.raises(ValueError, match="sweep cell fail failed \\(exit code 2\\)"):
        run_cell(["run", "--out", "grid/fail"])


def test_default_evaluation_flags_fit_a_short_context(tiny_model_dir, small_calib_file, tmp_path, monkeypatch):
    """No --max-length / --limit on a 256-token OPT: windows of 256 tokens, and the table is written."""
    out = tmp_path / "grid"

    def in_process(command: list[str]) -> None:
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 0, result.output

    monkeypatch.setattr(sweep_module, "run_cell", in_process)
    monkeypatch.setattr(sweep_module, "run_dense", dense_in_process)
    args = ["sweep", "--model", str(tiny_model_dir("opt")), "--pruner", "magnitude", "--method", "none",
            "--eval", str(small_calib_file), "--calib", str(small_calib_file), "--n-samples", "4",
            "--seq-len", "32", "--device", "cpu", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO((out / "sweep.csv").read_text())))
    assert [row["cell"] for row in rows] == ["dense", "magnitude-s0.5-none"]
    assert float(rows[1]["perplexity"]) > 1
    evaluation = json.loads((out / "magnitude-s0.5-none" / "reconstruct.json").read_text())["evaluation"]
    assert evaluation["seq_len"] == 256 and evaluation["windows"] >= 1
    assert "× 256 tokens" in (out / "sweep.md").read_text()
