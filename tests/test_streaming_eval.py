"""Evaluation streamed one block at a time equals evaluation with the whole model in memory.

Both run the model's own modules on the same micro-batches (the same shapes, so the same kernels and
summation order); only where the hidden states wait between blocks differs, and copying them is exact.
So logits and perplexities must be equal bit for bit, not merely close.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from conftest import TINY_CONFIGS
from reconstruct.evaluation import streaming as streaming_eval
from reconstruct.evaluation.perplexity import perplexity
from reconstruct.evaluation.streaming import InMemoryLM, StreamedLM, open_lm

EVAL_ARGS = dict(seq_len=32, max_windows=5, device="cpu", dtype="float32")


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_streamed_perplexity_equals_in_memory(tiny_model_dir, small_calib_file, arch):
    folder = str(tiny_model_dir(arch))
    batch_size = 2  # 5 windows: micro-batches of 2, 2 and 1
    whole = perplexity(folder, str(small_calib_file), batch_size=batch_size, stream=False, **EVAL_ARGS)
    streamed = perplexity(folder, str(small_calib_file), batch_size=batch_size, stream=True, **EVAL_ARGS)
    assert (whole["streamed"], streamed["streamed"]) == (False, True)
    assert (streamed["windows"], streamed["tokens"]) == (whole["windows"], whole["tokens"]) == (5, 160)
    assert streamed["perplexity"] == whole["perplexity"]  # same modules, same micro-batches: same bits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_streamed_logits_equal_in_memory_for_sets_of_different_lengths(tiny_model_dir, arch):
    folder = tiny_model_dir(arch)
    generator = torch.Generator().manual_seed(0)
    sets = [torch.randint(0, 512, (3, 7), generator=generator), torch.randint(0, 512, (1, 12), generator=generator)]
    device = torch.device("cpu")

    def collect(lm):
        return {(i, rows.start): logits.clone() for i, rows, logits in lm.logits(sets, 2)}

    whole = collect(InMemoryLM(folder, device, torch.float32))
    streamed = collect(StreamedLM(folder, device, torch.float32))
    assert whole.keys() == streamed.keys() == {(0, 0), (0, 2), (1, 0)}
    for key in whole:
        assert torch.equal(streamed[key], whole[key]), key  # same modules, same micro-batches: same bits


def test_auto_streams_when_the_model_does_not_fit(tiny_model_dir, monkeypatch):
    folder = tiny_model_dir("llama")
    device = torch.device("cpu")
    needed = streaming_eval.model_bytes(folder, torch.float32)
    assert needed > 0
    monkeypatch.setattr(streaming_eval, "available_bytes", lambda device: needed)  # needed > 0.8 × available
    assert isinstance(open_lm(folder, device, torch.float32), StreamedLM)
    monkeypatch.setattr(streaming_eval, "available_bytes", lambda device: 10 * needed)
    assert isinstance(open_lm(folder, device, torch.float32), InMemoryLM)


def test_model_bytes_counts_every_tensor(tiny_model_dir):
    from safetensors import safe_open

    folder = tiny_model_dir("opt")
    numel = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as handle:
            numel += sum(handle.get_tensor(key).numel() for key in handle.keys())
    assert streaming_eval.model_bytes(folder, torch.float32) == 4 * numel
    assert streaming_eval.model_bytes(folder, torch.bfloat16) == 2 * numel


def test_cli_eval_stream_flag(tiny_model_dir, small_calib_file):
    args = ["eval", "--model", str(tiny_model_dir("opt")), "--data", str(small_calib_file), "--seq-len", "32",
            "--max-windows", "3", "--device", "cpu"]
    runner = CliRunner()
    streamed = runner.invoke(app, [*args, "--stream"])
    whole = runner.invoke(app, [*args, "--no-stream"])
    assert streamed.exit_code == 0 and whole.exit_code == 0, streamed.output + whole.output
    streamed_result, whole_result = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (streamed, whole))
    assert streamed_result["streamed"] and not whole_result["streamed"]
    assert streamed_result["perplexity"] == whole_result["perplexity"]  # printed from the same float64 value
