"""Every folder the tool writes loads cleanly: config.json and the tensors agree, and the tool's commands accept it.

Each job runs with the guard's verdict forced per block (block 0 keeps its repair, block 1 has it
undone, ...), so one folder holds both outcomes; ``folder_check`` then loads it in stock transformers
(no missing or unexpected keys) and runs ``eval``, ``retrain``, ``shrink`` and ``inspect`` on it.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli import app
from conftest import TINY_CONFIGS, save_tiny_model
from folder_check import assert_loads_cleanly, check_written_folder
from reconstruct.loop.pipeline import BlockPipeline
from reconstruct.methods import METHOD_NAMES

KEPT, UNDONE = "kept", "undone"


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def forced_guard(monkeypatch):
    """The guard keeps the repair of even blocks and undoes that of odd ones; returns the verdicts given."""
    judge = BlockPipeline._judge
    verdicts: dict[int, str] = {}

    def forced(val_before, val_after, snapshot, index, cycle):
        keep = index % 2 == 0
        verdicts[index] = KEPT if keep else UNDONE
        return judge(1.0, 0.0, snapshot, index, cycle) if keep else judge(0.0, 1.0, snapshot, index, cycle)

    monkeypatch.setattr(BlockPipeline, "_judge", staticmethod(forced))
    return verdicts


def run_args(model, out, calib, method: str, *extra: str) -> list[str]:
    return ["run", "--model", str(model), "--out", str(out), "--calib", str(calib), "--method", method,
            "--n-samples", "4", "--seq-len", "16", "--recon-steps", "2", "--recon-val", "0.25", "--rank", "2",
            "--device", "cpu", "--micro-batch", "4", *(["--allow-dense-merge"] if method == "lora" else []), *extra]


def test_bias_ln_with_undone_blocks_and_shrink_on_a_model_without_biases(forced_guard, small_calib_file, tmp_path):
    """Issue 30's reproduction: tiny LLaMA without biases, heads 50%, bias-ln, the guard undoing block 1, --shrink."""
    model = save_tiny_model("llama", tmp_path / "llama")
    assert json.loads((model / "config.json").read_text())["attention_bias"] is False
    out = tmp_path / "out"
    result = CliRunner().invoke(app, run_args(model, out, small_calib_file, "bias-ln", "--pattern", "heads",
                                              "--sparsity", "0.5", "--seq-len", "32", "--shrink"))
    assert result.exit_code == 0, result.output
    assert set(forced_guard.values()) == {KEPT, UNDONE}
    config = json.loads((out / "config.json").read_text())
    assert config["attention_bias"] is True and config["mlp_bias"] is True
    tensors = {}
    for path in out.glob("model-*.safetensors"):
        tensors.update(load_file(path))
    undone = [index for index, verdict in forced_guard.items() if verdict == UNDONE]
    for index in undone:  # the undone blocks carry the flagged biases, as zeros
        biases = [name for name in tensors if name.startswith(f"model.layers.{index}.") and name.endswith("_proj.bias")]
        assert len(biases) == 7 and all(not tensors[name].any() for name in biases)
    assert_loads_cleanly(out / "shrunk")
    check_written_folder(out, tmp_path / "work", small_calib_file, shrinkable=True)


@pytest.mark.parametrize("method", [method for method in METHOD_NAMES if method != "none"])
@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_every_method_and_guard_outcome_writes_a_folder_that_loads_cleanly(forced_guard, tiny_model_dir,
                                                                           small_calib_file, tmp_path, arch, method):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, run_args(tiny_model_dir(arch), out, small_calib_file, method, "--sparsity", "0.5"))
    assert result.exit_code == 0, result.output
    assert set(forced_guard.values()) == {KEPT, UNDONE}  # both outcomes in one folder
    report = json.loads((out / "reconstruct.json").read_text())
    assert [block["recon_kept"] for block in report["blocks"]] == [i % 2 == 0 for i in range(len(report["blocks"]))]
    assert_loads_cleanly(out)
    if arch == "llama":  # the commands read a folder the same way for every architecture: one is enough
        check_written_folder(out, tmp_path / "work", small_calib_file)
