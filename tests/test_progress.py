"""Every phase that can take more than a few seconds shows a bar on stderr from its first seconds."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from reconstruct.modelio import source as model_source
from reconstruct.progress import PROGRESS_ENV, progress_bar

runner = CliRunner()


def test_default_style_run_shows_self_calibration_and_block_bars(tiny_model_dir, tmp_path, monkeypatch):
    """The README's default job (``--calib self``): a bar per generated token, then the block bar."""
    monkeypatch.setenv(PROGRESS_ENV, "1")
    result = runner.invoke(app, ["run", "--model", str(tiny_model_dir("llama")), "--n-samples", "2", "--seq-len", "8",
                                 "--device", "cpu", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "self-calibration" in result.stderr and "token" in result.stderr
    assert "blocks" in result.stderr
    assert result.stderr.index("self-calibration") < result.stderr.index("blocks")


def test_self_calibration_bar_ticks_per_token_and_keeps_the_samples(tiny_model_dir, monkeypatch, capsys):
    """The bar moves with every generated position; the sampled tokens do not depend on it."""
    from calib.self_generated import generate_self_calibration

    def sample() -> torch.Tensor:
        with progress_bar(desc="self-calibration", unit="token", total=3 * 5) as bar:  # the caller owns the bar
            return generate_self_calibration(tiny_model_dir("llama"), n_samples=3, seq_len=6, seed=0,
                                             device=torch.device("cpu"), dtype=torch.float32, batch_size=2,
                                             on_tokens=bar.update)

    monkeypatch.setenv(PROGRESS_ENV, "0")
    quiet = sample()
    monkeypatch.setenv(PROGRESS_ENV, "1")
    shown = sample()
    assert torch.equal(quiet, shown)
    assert "15/15" in capsys.readouterr().err  # 3 sequences × 5 generated tokens


def test_eval_defaults_show_a_window_bar(tiny_model_dir, small_calib_file, monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV, "1")
    result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir("llama")), "--data", str(small_calib_file),
                                 "--seq-len", "32", "--max-windows", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "eval" in result.stderr and "3/3" in result.stderr


def test_streamed_eval_shows_a_block_bar(tiny_model_dir, small_calib_file, monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV, "1")
    result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir("llama")), "--data", str(small_calib_file),
                                 "--seq-len", "32", "--max-windows", "2", "--device", "cpu", "--stream"])
    assert result.exit_code == 0, result.output
    assert "eval blocks" in result.stderr


@pytest.mark.usefixtures("lm_eval_task_index")  # conftest: lm-eval's task scan once per process
def test_zero_shot_shows_a_bar(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "piqa"
    folder.mkdir()
    folder.joinpath("valid.jsonl").write_text('{"goal": "the cat", "sol1": "sat down", "sol2": "flew off"}\n')
    folder.joinpath("valid-labels.lst").write_text("0\n")
    monkeypatch.setenv(PROGRESS_ENV, "1")
    result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir("llama")), "--tasks", "piqa",
                                 "--task-data", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "lm-eval" in result.stderr


def test_progress_off_when_switched_off(tiny_model_dir, small_calib_file, monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV, "0")
    result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir("llama")), "--data", str(small_calib_file),
                                 "--seq-len", "32", "--max-windows", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "eval:" not in result.stderr and "batch/s" not in result.stderr


def test_gguf_conversion_shows_a_bar(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Converting the default model (minutes on a slow machine) is a bar, not silence."""
    import transformers

    tiny = tiny_model_dir("llama")
    real_model, real_tokenizer = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda folder, gguf_file, dtype: real_model(tiny, dtype=dtype))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda folder, gguf_file: real_tokenizer(tiny))
    monkeypatch.setenv(PROGRESS_ENV, "1")
    target = model_source.convert_gguf(tmp_path, "tiny.gguf", tmp_path / "cache" / "tiny")
    assert (target / "config.json").is_file()
    err = capsys.readouterr().err
    assert "converting GGUF" in err and "3/3" in err


def test_log_lines_are_printed_above_a_bar_not_glued_onto_it(monkeypatch, capsys):
    """The one logging handler writes through tqdm: each record starts a line of its own."""
    import logging

    from reconstruct.progress import TqdmLoggingHandler

    monkeypatch.setenv(PROGRESS_ENV, "1")
    log = logging.getLogger("reconstruct.test-progress")
    handler = TqdmLoggingHandler()
    log.addHandler(handler)
    log.propagate = False
    try:
        with progress_bar(desc="blocks", unit="block", total=4) as bar:
            bar.update()
            log.warning("a line of its own")
            bar.update()
    finally:
        log.removeHandler(handler)
        log.propagate = True
    err = capsys.readouterr().err
    (line,) = [line for line in err.split("\n") if "a line of its own" in line]
    assert line.split("\r")[-1] == "a line of its own", repr(line)
    assert "4/4" not in line and "blocks" not in line.split("\r")[-1]


def test_retrain_shows_a_bar_while_merging_and_writing(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    from test_retrain import prune_folder

    monkeypatch.setenv(PROGRESS_ENV, "1")
    model = tmp_path / "pruned"
    shutil.copytree(tiny_model_dir("llama"), model)
    prune_folder(model, "llama")
    data = tmp_path / "text.txt"
    data.write_text(" ".join(["the cat sat on the mat ."] * 200))
    result = runner.invoke(app, ["retrain", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "out"),
                                 "--device", "cpu", "--seq-len", "16", "--n-samples", "4", "--samples-per-step", "2",
                                 "--steps", "1", "--val", "0"])
    assert result.exit_code == 0, result.output
    assert "merging and writing" in result.stderr and "4/4" in result.stderr  # 3 blocks, then the rest
