"""One name per idea in every command's ``--help``; the old names still work, hidden, with a notice."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from cli import app
from reconstruct import __version__
from reconstruct.cli.aliases import DEPRECATED_FLAGS, rewrite_deprecated

runner = CliRunner()
JOB_COMMANDS = ("run", "plan", "sweep", "retrain", "eval")

# idea -> {command: the flag that sets it there}; a command missing from a row does not have the idea.
IDEAS = {
    "samples per forward pass": {command: "--batch-size" for command in JOB_COMMANDS},
    "perplexity windows scored": {"run": "--limit", "sweep": "--limit", "retrain": "--limit", "eval": "--limit"},
    "tokens per perplexity window": {"run": "--max-length", "sweep": "--max-length", "retrain": "--max-length",
                                     "eval": "--max-length"},
    "perplexity test text": {"run": "--eval", "sweep": "--eval", "retrain": "--eval"},
    "reconstruction samples per optimizer step": {"run": "--recon-samples-per-step", "plan": "--recon-samples-per-step",
                                                  "sweep": "--recon-samples-per-step"},
    "retraining windows per optimizer step": {"retrain": "--samples-per-step", "run": "--retrain-samples-per-step",
                                              "plan": "--retrain-samples-per-step"},
    "retraining windows drawn": {"retrain": "--n-samples", "run": "--retrain-n-samples", "plan": "--retrain-n-samples"},
    "calibration windows drawn": {"run": "--n-samples", "plan": "--n-samples", "sweep": "--n-samples"},
}


def help_flags(command: str) -> set[str]:
    """Every ``--flag`` the command's ``--help`` lists."""
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", result.output))


@pytest.fixture(scope="module")
def helps() -> dict[str, set[str]]:
    return {command: help_flags(command) for command in JOB_COMMANDS}


@pytest.mark.parametrize("idea", IDEAS)
def test_every_command_lists_the_same_name_for_the_same_idea(helps, idea):
    for command, flag in IDEAS[idea].items():
        assert flag in helps[command], f"{command} --help lacks {flag} ({idea})"


@pytest.mark.parametrize("command", JOB_COMMANDS)
def test_no_help_lists_an_old_name(helps, command):
    assert not helps[command] & set(DEPRECATED_FLAGS[command]), helps[command] & set(DEPRECATED_FLAGS[command])


def test_run_names_the_retraining_stage_as_retrain_names_its_flags(helps):
    for flag in ("--steps", "--samples-per-step", "--seq-len", "--lr", "--n-samples", "--val", "--method"):
        assert flag in helps["retrain"]
        assert "--retrain-" + flag[2:] in helps["run"], flag


@pytest.mark.parametrize("command, old, new", [(command, old, new) for command, renames in DEPRECATED_FLAGS.items()
                                               for old, new in renames.items()])
def test_old_names_still_parse_with_one_notice(command, old, new):
    args, notices = rewrite_deprecated([command, "--model", "m", old, "7", f"{old}=8", "--", old])
    assert args == [command, "--model", "m", new, "7", f"{new}=8", "--", old]
    assert notices == [f"warning: {old} is deprecated; use {new} (same meaning)"]


def test_an_old_name_reaches_the_command_as_the_new_one(monkeypatch):
    seen = {}

    def fake_perplexity(model, data, seq_len=None, max_windows=None, **kwargs):
        seen.update(seq_len=seq_len, max_windows=max_windows)
        return {"perplexity": 1.0}

    monkeypatch.setattr("reconstruct.cli.evaluate.perplexity", fake_perplexity)
    result = runner.invoke(app, ["eval", "--data", "x.txt", "--seq-len", "64", "--max-windows", "3"])
    assert result.exit_code == 0, result.output
    assert seen == {"seq_len": 64, "max_windows": 3}
    assert "warning: --seq-len is deprecated; use --max-length" in result.stderr
    assert "warning: --max-windows is deprecated; use --limit" in result.stderr


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"reconstruct {__version__}"


def test_sweep_help_lists_every_pruner_it_accepts():
    from pruners.registry import PRUNER_NAMES

    text = " ".join(runner.invoke(app, ["sweep", "--help"]).output.split())
    for name in PRUNER_NAMES:
        assert name in text.split("Pruners, comma-separated:")[1].split(".")[0], name
