"""Bad input to ``reconstruct run``: one clear ``error:`` line (usage errors too), exit code 2, no traceback.

Every case passes a local calibration file, a few short samples and ``--device cpu`` so nothing is
downloaded, and an explicit ``--out`` inside ``tmp_path`` that a refused job must not create.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app

runner = CliRunner()


def quick_args(calib_file: Path) -> list[str]:
    return ["--calib", str(calib_file), "--n-samples", "4", "--seq-len", "16", "--device", "cpu"]


def invoke(args: list[str]):
    return runner.invoke(app, ["run", *args])


def assert_clean_error(result) -> str:
    """Exit 2, no exception escaped, no traceback, no usage box; one ``error:`` line. Returns the message."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert "Usage:" not in result.output and "─" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every path under ``folder`` with its bytes (files) and mtime."""
    return {
        str(path.relative_to(folder)): (path.read_bytes() if path.is_file() else b"<dir>", path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
    }


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default --out, if any code path used one, lands here


# --------------------------------------------------------------------------- option values
@pytest.mark.parametrize(
    "extra, words",
    [
        (["--pruner", "foo"], ["--pruner", "'foo'", "wanda", "sparsegpt"]),
        (["--sparsity", "1.0"], ["--sparsity", "[0, 1)"]),
        (["--sparsity", "-0.1"], ["--sparsity", "[0, 1)"]),
        (["--pattern", "5:4"], ["--pattern", "5:4"]),
        (["--pattern", "0:4"], ["--pattern", "0:4"]),
        (["--pattern", "2:4", "--sparsity", "0.3"], ["--sparsity", "2:4"]),
        (["--pattern", "two-of-four"], ["--pattern"]),
        (["--mask-scope", "column"], ["--mask-scope"]),
        (["--method", "lora"], ["--allow-dense-merge"]),
        (["--method", "bogus"], ["--method", "masklora"]),
        (["--granularity", "layer"], ["--granularity", "sublayer"]),
        (["--target", "global"], ["--target", "local"]),
        (["--offload", "tape"], ["--offload", "disk"]),
        (["--cycle-schedule", "cosine"], ["--cycle-schedule", "cubic"]),
        (["--n-samples", "0"], ["--n-samples"]),
        (["--device", "tpu"], ["--device"]),
        (["--checkpoint-every", "0"], ["--checkpoint-every", "auto"]),
    ],
    ids=["pruner-foo", "sparsity-1", "sparsity-negative", "pattern-5of4", "pattern-0of4", "pattern-2of4-sparsity-0.3",
         "pattern-garbage", "mask-scope", "lora-without-dense-merge", "method-bogus", "granularity-bogus",
         "target-bogus", "offload-bogus", "cycle-schedule-bogus", "n-samples-0", "device-tpu",
         "checkpoint-every-0"],
)
def test_bad_option_value_is_one_clear_error(tiny_model_dir, calib_file, tmp_path, extra, words):
    out = tmp_path / "out"
    result = invoke(["--model", str(tiny_model_dir("llama")), "--out", str(out), *quick_args(calib_file), *extra])
    message = assert_clean_error(result)
    for word in words:
        assert word in message, message
    assert not out.exists()


# --------------------------------------------------------------------------- models
def test_missing_model_path(calib_file, tmp_path):
    out = tmp_path / "out"
    message = assert_clean_error(invoke(["--model", "./does-not-exist", "--out", str(out), *quick_args(calib_file)]))
    assert "--model" in message and "does-not-exist" in message
    assert not out.exists()


def _save_bert(folder: Path) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertForMaskedLM(config).save_pretrained(folder)
    return folder


def _save_t5(folder: Path) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("make, words", [(_save_bert, ["causal LM", "BertForMaskedLM"]), (_save_t5, ["encoder-decoder"])],
                         ids=["bert-masked-lm", "t5-encoder-decoder"])
def test_model_that_is_not_a_decoder_only_causal_lm(calib_file, tmp_path, make, words):
    model = make(tmp_path / "model")
    out = tmp_path / "out"
    message = assert_clean_error(invoke(["--model", str(model), "--out", str(out), *quick_args(calib_file)]))
    assert "--model" in message
    for word in words:
        assert word in message, message
    assert not out.exists()


# --------------------------------------------------------------------------- --out
def test_out_folder_holding_something_else_is_refused_and_untouched(tiny_model_dir, calib_file, tmp_path):
    out = tmp_path / "photos"
    (out / "album").mkdir(parents=True)
    (out / "notes.txt").write_text("do not touch\n")
    (out / "album" / "cat.bin").write_bytes(bytes(range(256)))
    before = snapshot(out)
    result = invoke(["--model", str(tiny_model_dir("llama")), "--out", str(out), *quick_args(calib_file), "--method", "none"])
    message = assert_clean_error(result)
    assert "--out" in message and "not empty" in message
    assert snapshot(out) == before


def test_out_that_is_a_file_is_refused(tiny_model_dir, calib_file, tmp_path):
    out = tmp_path / "a-file"
    out.write_text("x")
    message = assert_clean_error(invoke(["--model", str(tiny_model_dir("llama")), "--out", str(out), *quick_args(calib_file)]))
    assert "--out" in message
    assert out.read_text() == "x"


def test_resume_with_different_arguments_is_refused(tiny_model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    common = ["--model", str(tiny_model_dir("llama")), "--out", str(out), *quick_args(calib_file),
              "--pruner", "magnitude", "--method", "none"]
    first = invoke([*common, "--sparsity", "0.5"])
    assert first.exit_code == 0, first.output
    before = snapshot(out)
    message = assert_clean_error(invoke([*common, "--sparsity", "0.6"]))
    assert "sparsity" in message and "0.5" in message and "0.6" in message
    assert "--force" in message
    assert snapshot(out) == before


# --------------------------------------------------------------------------- input refused once the model is known
def test_seq_len_longer_than_the_position_table_is_a_clear_error(tiny_model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    args = ["--model", str(tiny_model_dir("gpt2")), "--out", str(out), "--calib", str(calib_file),
            "--n-samples", "2", "--seq-len", "300", "--device", "cpu", "--method", "none"]  # n_positions = 256
    message = assert_clean_error(invoke(args))
    assert "--seq-len" in message


@pytest.mark.parametrize(
    "bad, good, words",
    [
        (["--calib", "missing.txt"], [], ["missing.txt"]),
        (["--pattern", "3:7"], ["--pattern", "2:4"], ["--pattern", "3:7"]),
    ],
    ids=["missing-calib-file", "nm-not-tiling-layers"],
)
def test_input_refused_during_the_run_leaves_out_reusable(tiny_model_dir, calib_file, tmp_path, bad, good, words):
    out = tmp_path / "out"
    common = ["--model", str(tiny_model_dir("llama")), "--out", str(out), *quick_args(calib_file),
              "--pruner", "magnitude", "--method", "none"]
    message = assert_clean_error(invoke([*common, *bad]))  # a later --calib overrides the one in quick_args
    for word in words:
        assert word in message, message
    fixed = invoke([*common, *good])
    assert fixed.exit_code == 0, fixed.output
    assert (out / "reconstruct.json").is_file()


# --------------------------------------------------------------------------- the real console script
def test_console_script_prints_one_line_and_no_traceback(calib_file, tmp_path):
    script = shutil.which("reconstruct")
    command = [script] if script else [sys.executable, "-c", "from cli import app; app()"]
    out = tmp_path / "out"
    proc = subprocess.run(
        [*command, "run", "--model", "./does-not-exist", "--out", str(out), *quick_args(calib_file)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--model" in errors[0], proc.stderr
    assert not out.exists()


# --------------------------------------------------------------------------- settings that prune nothing
@pytest.mark.parametrize(
    "extra, words",
    [
        (["--pattern", "heads", "--sparsity", "0.05"], ["--sparsity 0.05", "rounds to 0 of the 4 heads"]),
        (["--pattern", "channels", "--sparsity", "0.001"], ["--sparsity 0.001", "rounds to 0 of the 128 channels"]),
        (["--sparsity", "0.001"], ["--sparsity 0.001", "rounds to 0 weights removed per row"]),
        (["--sparsity", "0.00001", "--mask-scope", "layer"], ["rounds to 0 weights removed per layer"]),
        (["--pattern", "channels", "--sparsity", "0.999"], ["rounds to all 128 channels"]),
    ],
    ids=["heads-0", "channels-0", "row-0", "layer-0", "channels-all"],
)
def test_sparsity_that_rounds_to_no_pruning_is_refused(tiny_model_dir, calib_file, tmp_path, extra, words):
    out = tmp_path / "out"
    result = invoke(["--model", str(tiny_model_dir("llama")), "--out", str(out), *quick_args(calib_file), *extra])
    message = assert_clean_error(result)
    for word in words:
        assert word in message, message
    assert not out.exists()


# --------------------------------------------------------------------------- length flags against the model's context
def _no_block_work(*args, **kwargs):
    raise AssertionError("a block was processed before the length flags were checked")


def test_eval_seq_len_longer_than_the_context_stops_before_any_block(tiny_model_dir, calib_file, tmp_path, monkeypatch):
    monkeypatch.setattr("reconstruct.jobs.run_job.BlockPipeline.process", _no_block_work)
    out = tmp_path / "out"
    args = ["--model", str(tiny_model_dir("opt")), "--out", str(out), *quick_args(calib_file), "--method", "none",
            "--eval", str(calib_file), "--max-length", "4096"]  # max_position_embeddings = 256
    message = assert_clean_error(invoke(args))
    assert "--max-length 4096" in message and "256" in message, message
    assert not out.exists()


@pytest.mark.parametrize("command, words", [
    (["eval", "--max-length", "4096"], ["--max-length 4096", "256"]),
    (["plan", "--seq-len", "4096"], ["--seq-len 4096", "256"]),
    (["sweep", "--max-length", "4096", "--seq-len", "32"], ["--max-length 4096", "256"]),
    (["sweep", "--seq-len", "4096"], ["--seq-len 4096", "256"]),
], ids=["eval-max-length", "plan-seq-len", "sweep-max-length", "sweep-seq-len"])
def test_length_flags_of_other_commands_are_checked_first(tiny_model_dir, calib_file, tmp_path, monkeypatch,
                                                          command, words):
    monkeypatch.setattr("reconstruct.evaluation.perplexity.open_lm", _no_block_work)
    monkeypatch.setattr("reconstruct.jobs.sweep.run_cell", _no_block_work)
    name, *flags = command
    extra = {"eval": ["--data", str(calib_file), "--device", "cpu"],
             "plan": ["--device", "cpu", "--n-samples", "2"],
             "sweep": ["--eval", str(calib_file), "--out", str(tmp_path / "s"), "--device", "cpu"]}[name]
    result = runner.invoke(app, [name, "--model", str(tiny_model_dir("opt")), *extra, *flags])
    message = assert_clean_error(result)
    for word in words:
        assert word in message, message
    assert not (tmp_path / "s").exists()


def test_default_eval_window_is_the_smaller_of_2048_and_the_context():
    from types import SimpleNamespace

    from reconstruct.modelio.facts import default_eval_seq_len, resolve_eval_seq_len

    assert default_eval_seq_len(SimpleNamespace(max_position_embeddings=512)) == 512
    assert default_eval_seq_len(SimpleNamespace(n_positions=1024)) == 1024
    assert default_eval_seq_len(SimpleNamespace(max_position_embeddings=32768)) == 2048
    assert default_eval_seq_len(SimpleNamespace()) == 2048  # no limit in the config
    assert resolve_eval_seq_len(None, SimpleNamespace(max_position_embeddings=512), "--seq-len") == 512
    assert resolve_eval_seq_len(512, SimpleNamespace(max_position_embeddings=512), "--seq-len") == 512
    with pytest.raises(ValueError, match="--seq-len 513 exceeds the model's context length 512"):
        resolve_eval_seq_len(513, SimpleNamespace(max_position_embeddings=512), "--seq-len")
