"""``run --eval-tasks`` and ``retrain --eval-tasks`` record lm-eval's task table beside perplexity; ``sweep`` shows a column per task.

Tasks come from ``tests/data/lm_eval`` (``tiny_mc``: a made-up multiple-choice task of 5 items), so
nothing is fetched.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from reconstruct.config import EvalSpec
from reconstruct.jobs.sweep import Cell, SweepSpec, cell_command
from reconstruct.reporting.sweep import _csv_text, render_markdown, task_columns
from test_report import EVAL_FLAGS, quick_run_args, table_rows

pytest.importorskip("lm_eval")
from reconstruct.evaluation.tasks import TaskEvalSpec  # noqa: E402

pytestmark = pytest.mark.usefixtures("lm_eval_task_index")  # conftest: lm-eval's task scan once per process
TASK_DATA = Path(__file__).parent / "data" / "lm_eval"
TASK_FLAGS = ["--eval-tasks", "tiny_mc", "--task-data", str(TASK_DATA)]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_run_eval_tasks_writes_the_table_beside_perplexity_and_a_rerun_keeps_it(tiny_model_dir, small_calib_file, tmp_path):
    out = tmp_path / "out"
    args = [*quick_run_args(tiny_model_dir("llama"), small_calib_file, out), "--eval", str(small_calib_file),
            *EVAL_FLAGS, *TASK_FLAGS]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "reconstruct.json").read_text())
    tasks = report["task_evaluation"]
    # EVAL_FLAGS' --limit 4 (given by its old name) caps the perplexity windows and the items of each task alike
    assert tasks["tasks"] == ["tiny_mc"] and tasks["task_data"] == str(TASK_DATA.resolve()) and tasks["limit"] == 4
    row = tasks["results"]["tiny_mc"]
    assert row["n"] == 4 and 0.0 <= row["acc"] <= 1.0 and 0.0 <= row["acc_norm"] <= 1.0
    totals = dict(table_rows((out / "report.md").read_text(), "| | |"))
    assert "perplexity" in totals and totals["tiny_mc"].startswith(f"acc {row['acc']:.4f} ± ")
    assert totals["tiny_mc"].endswith("(4 items)")

    again = CliRunner().invoke(app, args)  # finished and evaluated as asked: not evaluated again
    assert again.exit_code == 0, again.output
    assert json.loads((out / "reconstruct.json").read_text())["task_evaluation"] == tasks


def test_retrain_eval_tasks_scores_before_and_after(tiny_model_dir, small_calib_file, tmp_path):
    import shutil

    from test_retrain import prune_folder
    from test_retrain_cli import FLAGS

    model = tmp_path / "pruned"
    shutil.copytree(tiny_model_dir("llama"), model)
    prune_folder(model, "llama")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["retrain", "--model", str(model), "--data", str(small_calib_file), "--out", str(out),
                                      *FLAGS, *TASK_FLAGS, "--limit", "3"])
    assert result.exit_code == 0, result.output
    tasks = json.loads((out / "reconstruct.json").read_text())["task_evaluation"]
    assert tasks["limit"] == 3 and tasks["before"]["tiny_mc"]["n"] == tasks["after"]["tiny_mc"]["n"] == 3
    markdown = (out / "report.md").read_text()
    assert "- tiny_mc before: acc " in markdown and "- tiny_mc after: acc " in markdown


def test_task_flags_are_checked_before_any_work(tiny_model_dir, small_calib_file, tmp_path):
    args = quick_run_args(tiny_model_dir("llama"), small_calib_file, tmp_path / "out")
    for extra, words in ((["--task-data", str(TASK_DATA)], "only applies with --eval-tasks"),
                         (["--eval-tasks", "tiny_mc", "--task-data", str(tmp_path / "missing")], "no such folder")):
        result = CliRunner().invoke(app, [*args, *extra])
        assert result.exit_code == 2 and words in result.output, result.output
        assert not (tmp_path / "out").exists()


def test_sweep_passes_the_tasks_to_every_cell_and_shows_a_column_per_task(tmp_path):
    spec = SweepSpec(out=tmp_path, pruners=("wanda",), patterns=("unstructured",), sparsities=(0.5,),
                     methods=("none",), evaluation=EvalSpec("wikitext2"),
                     task_evaluation=TaskEvalSpec(("piqa", "tiny_mc"), str(TASK_DATA), 50))
    command = cell_command(spec, Cell("wanda", "unstructured", 0.5, "none"))
    assert command[command.index("--eval-tasks") + 1] == "piqa,tiny_mc"
    assert command[command.index("--task-data") + 1] == str(TASK_DATA.resolve())
    assert command[command.index("--limit") + 1] == "50"

    columns = task_columns({"results": {"piqa": {"acc": 0.6, "acc_stderr": 0.01, "acc_norm": 0.62, "n": 50},
                                        "tiny_mc": {"acc": 0.4, "n": 5, "seconds": 3.0}}})
    assert columns == {"piqa acc_norm": 0.62, "tiny_mc acc": 0.4}
    row = {"cell": "wanda-s0.5-none", "pruner": "wanda", "pattern": "unstructured", "sparsity": 0.5, "method": "none",
           "perplexity": 30.0, "achieved_sparsity": 0.5, "time_s": 1.0, "peak_rss_mb": 100.0, "peak_gpu_mb": None,
           "trainable_share": 0.0, "eval_seconds": 1.0, **columns}
    header, values = _csv_text([row]).splitlines()
    assert header.endswith(",piqa acc_norm,tiny_mc acc") and values.endswith(",0.62,0.4")
    markdown = render_markdown(spec, [row], figure_drawn=True)
    assert "| perplexity | piqa acc_norm | tiny_mc acc | time |" in markdown and "| 30.000 | 0.6200 | 0.4000 |" in markdown


def test_eval_tasks_without_lm_eval_names_the_extra(tiny_model_dir, small_calib_file, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    args = quick_run_args(tiny_model_dir("llama"), small_calib_file, tmp_path / "out")
    result = CliRunner().invoke(app, [*args, *TASK_FLAGS])
    assert result.exit_code == 2 and "--eval-tasks needs lm-evaluation-harness" in result.output and "[eval]" in result.output
    assert not (tmp_path / "out").exists()
