"""What a new user reads: interrupts, re-runs, status of a missing folder, ``--help`` at 80 columns."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from cli import app

runner = CliRunner()
COMMANDS = ("run", "plan", "eval", "status", "sweep", "inspect")


def quick_run(model, calib, out) -> list[str]:
    return ["run", "--model", str(model), "--calib", str(calib), "--n-samples", "4", "--seq-len", "16",
            "--device", "cpu", "--out", str(out)]


def test_ctrl_c_says_where_the_job_stopped_and_how_to_resume(tiny_model_dir, small_calib_file, tmp_path, monkeypatch):
    import reconstruct.loop.pruning as pipeline  # where the statistics crash point sits

    def interrupt_in_block_2(point: str) -> None:
        if point == "statistics:1":  # 0-based index 1: the second block
            raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "crash_point", interrupt_in_block_2)
    out = tmp_path / "out"
    result = runner.invoke(app, quick_run(tiny_model_dir("llama"), small_calib_file, out))
    assert result.exit_code == 130, result.output
    assert "interrupted with 1 of 3 blocks done" in result.stderr
    assert "the same command resumes it at block 2 of 3" in result.stderr
    monkeypatch.undo()
    resumed = runner.invoke(app, quick_run(tiny_model_dir("llama"), small_calib_file, out))
    assert resumed.exit_code == 0, resumed.output


def test_rerun_of_a_finished_job_does_not_claim_it_wrote(tiny_model_dir, small_calib_file, tmp_path):
    args = quick_run(tiny_model_dir("llama"), small_calib_file, tmp_path / "out")
    first = runner.invoke(app, args)
    assert first.exit_code == 0 and first.stdout.startswith("wrote "), first.output
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "wrote" not in again.stdout
    assert "already holds this finished job" in again.stdout


def test_status_of_a_missing_folder_says_so(tmp_path):
    result = runner.invoke(app, ["status", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "no such folder" in result.stderr and "holds no reconstruct job" not in result.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_help_at_80_columns_keeps_flag_names_and_shows_defaults(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    result = runner.invoke(app, [command, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    options = re.split(r"\n(?=  -)", text.split("Options:", 1)[1].strip("\n"))  # one entry per option
    for entry in options:
        name = entry.split()[0]
        if name == "--help" or "[required]" in entry:
            continue
        assert "[default:" in entry, f"{command} {name}: no default shown"


def test_help_names_the_cache_variable():
    result = runner.invoke(app, ["--help"], terminal_width=80)
    assert "RECONSTRUCT_CACHE" in result.stdout
