"""``report.md`` / ``report.png`` next to ``reconstruct.json``, and ``run --eval``.

One job (tiny LLaMA, Wanda 50%, bias-ln for a few steps, evaluated on 4 windows) is run through the
CLI once per module; the report's numbers are checked against ``reconstruct.json``. A second job
runs with matplotlib hidden (``sys.modules`` entries set to None, as if it were not installed).
"""

from __future__ import annotations

import json
import re
import sys

import pytest
from typer.testing import CliRunner

from cli import app
from conftest import make_job
from reconstruct.reporting import plots
from reconstruct.config import EvalSpec
from reconstruct.jobs.run_job import run_job
from reconstruct.state.manifest import Manifest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVAL_FLAGS = ["--eval-seq-len", "32", "--eval-windows", "4"]


def quick_run_args(model, calib, out) -> list[str]:
    return ["run", "--model", str(model), "--out", str(out), "--pruner", "wanda", "--sparsity", "0.5",
            "--method", "bias-ln", "--recon-steps", "3", "--calib", str(calib), "--n-samples", "8", "--seq-len", "32",
            "--micro-batch", "4", "--device", "cpu",
            "--no-recon-guard"]  # 3 steps barely move the held-out error: the guard could undo a block (tests/test_recon_guard.py)


DRAWS_FIGURES = True  # conftest: this module's jobs draw report.png (its figure tests check it)


@pytest.fixture(scope="module")
def evaluated_run(tiny_model_dir, small_calib_file, tmp_path_factory):
    """``(out, reconstruct.json, cli output)`` of a job run with ``--eval``."""
    out = tmp_path_factory.mktemp("report") / "out"
    args = quick_run_args(tiny_model_dir("llama"), small_calib_file, out)
    result = CliRunner().invoke(app, [*args, "--eval", str(small_calib_file), *EVAL_FLAGS])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "reconstruct.json").read_text()), result.output


def table_rows(markdown: str, header_start: str) -> list[list[str]]:
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_report_md_has_a_row_per_block_matching_the_json(evaluated_run):
    out, report, _ = evaluated_run
    markdown = (out / "report.md").read_text()
    rows = table_rows(markdown, "| block |")
    assert len(rows) == len(report["blocks"]) == 3
    for row, block in zip(rows, report["blocks"]):
        index, sparsity, before, after, ratio, relative_before, relative_after, trainable, steps = row[:9]
        assert int(index) == block["index"] + 1  # numbered from 1, as in the log and status
        # the same float64 values through the same format specifications: the same text, no tolerance
        scale = block["target_mean_square"]
        assert scale > 0
        assert relative_before == f"{block['mse_before'] / scale:.3e}"
        assert relative_after == f"{block['mse_after'] / scale:.3e}"
        mean_sparsity = sum(block["sparsity"].values()) / len(block["sparsity"])
        assert sparsity == f"{mean_sparsity:.4f}"
        assert (before, after) == (f"{block['mse_before']:.4e}", f"{block['mse_after']:.4e}")
        assert ratio == f"{block['mse_after'] / block['mse_before']:.3f}"
        assert int(trainable.replace(",", "")) == block["trainable_params"] > 0
        assert int(steps) == block["recon_steps"] == 3
    assert block["mse_after"] < block["mse_before"]  # reconstruction helped (the values are not copies)


def test_report_md_totals_match_the_json(evaluated_run):
    out, report, output = evaluated_run
    totals = dict(table_rows((out / "report.md").read_text(), "| | |"))
    assert totals["time"] == f"{report['elapsed_seconds']:.1f} s"
    assert totals["peak host memory (RSS)"] == f"{report['peak_rss_mb']:.0f} MiB"
    assert totals["peak GPU memory"] == "–"  # CPU job
    trainable = sum(block["trainable_params"] for block in report["blocks"])
    assert totals["trainable parameters"].startswith(f"{trainable:,} (")
    assert totals["mean linear sparsity"] == f"{report['mean_linear_sparsity']:.4f}"
    evaluation = report["evaluation"]
    assert totals["perplexity"].startswith(f"{evaluation['perplexity']:.3f} on valid-head.txt (4 windows × 32 tokens")
    assert (evaluation["windows"], evaluation["seq_len"], evaluation["max_windows"]) == (4, 32, 4)
    assert evaluation["perplexity"] > 1
    assert f"perplexity {evaluation['perplexity']:.3f}" in output


def test_run_eval_equals_reconstruct_eval(evaluated_run, small_calib_file):
    out, report, _ = evaluated_run
    result = CliRunner().invoke(app, ["eval", "--model", str(out), "--data", str(small_calib_file), "--seq-len", "32",
                                      "--max-windows", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    # one code path (perplexity() with the same model, data, windows, batch size and dtype): the same bits
    assert json.loads(result.stdout.strip().splitlines()[-1])["perplexity"] == report["evaluation"]["perplexity"]


def test_report_png_is_a_valid_png(evaluated_run):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'reconstruct[plot]'): no report.png to check")
    import matplotlib.image

    out, _, _ = evaluated_run
    png = out / "report.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert "![MSE and sparsity per block](report.png)" in (out / "report.md").read_text()


def hide_matplotlib(monkeypatch) -> None:
    """Make every ``import matplotlib...`` fail, as if it were not installed."""
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_run_without_matplotlib_writes_the_report_and_says_how_to_get_the_figure(
        tiny_model_dir, small_calib_file, tmp_path, monkeypatch):
    job = make_job(tiny_model_dir("opt"), tmp_path / "out", "magnitude", calib=small_calib_file)
    with monkeypatch.context() as patch:
        hide_matplotlib(patch)
        assert not plots.matplotlib_available()
        report = run_job(job)
    out = job.out
    assert not (out / "report.png").exists()
    markdown = (out / "report.md").read_text()
    assert "No report.png: matplotlib is not installed" in markdown and "pip install 'reconstruct[plot]'" in markdown
    assert len(table_rows(markdown, "| block |")) == len(report["blocks"]) == 3
    assert "not evaluated" in markdown
    assert Manifest.load(out).finished
    if plots.matplotlib_available():  # what report.md promises: the same command again draws the figure
        again = run_job(job)
        assert again["already_finished"]
        assert (out / "report.png").read_bytes()[:8] == PNG_MAGIC
        assert "![MSE and sparsity per block](report.png)" in (out / "report.md").read_text()


def test_eval_added_to_a_finished_job_is_recorded_once(tiny_model_dir, small_calib_file, tmp_path, monkeypatch):
    import dataclasses

    from reconstruct.jobs import run_job as engine

    job = make_job(tiny_model_dir("gpt2"), tmp_path / "out", "magnitude", calib=small_calib_file)
    run_job(job)
    assert "evaluation" not in json.loads((job.out / "reconstruct.json").read_text())
    evaluated = dataclasses.replace(job, evaluation=EvalSpec(str(small_calib_file), seq_len=32, max_windows=3))
    report = run_job(evaluated)
    assert report["already_finished"] and report["evaluation"]["windows"] == 3
    stored = json.loads((job.out / "reconstruct.json").read_text())
    assert stored["evaluation"] == report["evaluation"]
    assert re.search(r"\| perplexity \| [0-9.]+ on valid-head.txt \(3 windows", (job.out / "report.md").read_text())

    def no_work(*args, **kwargs):
        raise AssertionError("a finished, evaluated job did work again")

    monkeypatch.setattr(engine, "_run_blocks", no_work)
    monkeypatch.setattr("reconstruct.jobs.finish.perplexity", no_work)
    again = run_job(evaluated)  # the rewritten reconstruct.json is the job's recorded output: nothing to redo
    assert again["already_finished"] and again["evaluation"] == stored["evaluation"]


def test_bad_eval_is_refused_before_any_work(tiny_model_dir, small_calib_file, tmp_path):
    out = tmp_path / "out"
    args = quick_run_args(tiny_model_dir("llama"), small_calib_file, out)
    for bad, words in (("missing.txt", "no such file"), ("not-a-dataset", "not a file or a known dataset")):
        result = CliRunner().invoke(app, [*args, "--eval", bad])
        assert result.exit_code == 2, result.output
        assert "--eval" in result.output and words in result.output
        assert not out.exists()


def test_validation_curve_is_numbered_like_the_mse_curve():
    """report.png numbers blocks from 1; the held-out error must sit over the same blocks as the MSE."""

    class RecordingAxes:
        def __init__(self):
            self.xs: list[list[int]] = []

        def plot(self, xs, ys, **style):
            self.xs.append(list(xs))

        def scatter(self, xs, ys, **style):
            self.xs.append(list(xs))

    rows = [{"index": 0, "val_before": 2.0, "val_after": 1.0, "recon_kept": True},
            {"index": 1, "val_before": 2.0, "val_after": 3.0, "recon_kept": False}]
    axes = RecordingAxes()
    plots._plot_validation(axes, rows)
    assert axes.xs == [[1, 2], [1, 2], [2]]  # before, after, the undone block


@pytest.mark.parametrize(("loss", "n_axes"), [("mse", 2), ("token-relative", 3)])
def test_a_validation_error_other_than_the_mse_gets_its_own_axis(loss, n_axes, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed: no report.png to draw")
    drawn = []
    monkeypatch.setattr(plots, "save_figure", lambda figure, path: drawn.append(figure))
    rows = [{"index": i, "mse_before": 10.0, "mse_after": 5.0, "sparsity": 0.5, "val_before": 0.2,
             "val_after": 0.1, "recon_kept": True} for i in range(3)]
    assert plots.plot_blocks(rows, "t", 0.5, tmp_path / "report.png", validation_loss=loss)
    axes = drawn[0].axes
    assert len(axes) == n_axes  # MSE and sparsity panels, and the validation error's own axis if not the MSE
    if loss != "mse":
        assert "token-relative" in axes[-1].get_ylabel()
        assert [line.get_label() for line in axes[-1].get_lines()] == ["validation before", "validation after"]
