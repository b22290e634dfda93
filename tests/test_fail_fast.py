"""Checks that can fail fast come before the memory plan, and offline dataset names fail in seconds."""

from __future__ import annotations

import logging
import time

import pytest
from typer.testing import CliRunner

from calib import text_sources
from cli import app

runner = CliRunner()
PLAN_WORDS = ("activation streams", "one block (weights)")  # lines of the memory plan


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def test_too_short_calibration_text_is_refused_before_the_plan(tiny_model_dir, tmp_path, caplog):
    words = tmp_path / "three-words.txt"
    words.write_text("three words only\n")
    out = tmp_path / "out"
    with caplog.at_level(logging.DEBUG):
        result = runner.invoke(app, ["run", "--model", str(tiny_model_dir("llama")), "--calib", str(words),
                                     "--n-samples", "2", "--seq-len", "16", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result)
    assert "--calib" in line and "3 tokens" in line and "--seq-len 16" in line, line
    assert result.output.rstrip().splitlines()[-1] == line
    planned = [record for record in caplog.records if any(word in record.getMessage() for word in PLAN_WORDS)]
    assert not planned, [record.getMessage() for record in planned]
    assert not out.exists()


def test_the_plan_is_logged_once_the_checks_pass(tiny_model_dir, small_calib_file, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        result = runner.invoke(app, ["run", "--model", str(tiny_model_dir("llama")), "--calib", str(small_calib_file),
                                     "--n-samples", "2", "--seq-len", "16", "--device", "cpu", "--method", "none",
                                     "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    plan_lines = [record for record in caplog.records if record.levelno == logging.INFO
                  and "activation streams" in record.getMessage()]
    assert len(plan_lines) == 1


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """The hub unreachable and an empty datasets cache; every offline switch restored afterwards."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(text_sources, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", datasets.config.HF_DATASETS_OFFLINE)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "0")


@pytest.mark.parametrize("command", ["eval", "run"])
def test_offline_dataset_name_fails_in_seconds_with_the_local_file_hint(command, offline, tiny_model_dir, tmp_path):
    model = str(tiny_model_dir("llama"))
    args = {"eval": ["eval", "--model", model, "--data", "wikitext2", "--device", "cpu"],
            "run": ["run", "--model", model, "--calib", "wikitext2", "--n-samples", "2", "--seq-len", "16",
                    "--device", "cpu", "--out", str(tmp_path / "out")]}[command]
    started = time.perf_counter()
    result = runner.invoke(app, args)
    seconds = time.perf_counter() - started
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result)
    assert "wikitext2" in line and "unreachable" in line and "local .txt/.jsonl file" in line, line
    assert "Retrying" not in result.output
    assert seconds < 20, seconds  # a minute of retries before
    assert not (tmp_path / "out").exists()
