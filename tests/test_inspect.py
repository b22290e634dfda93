"""``reconstruct inspect``: exact per-layer sparsity of pruned and dense folders, and N:M compliance.

Expected numbers are counted here independently, straight from the safetensors files; GPT-2's
``Conv1D`` weights are stored (in, out), so its N:M groups run along the stored rows.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli import app
from reconstruct.reporting.inspect import count_layer, inspect_folder

LLAMA_LINEARS = {  # tiny llama: (out, in) of each prunable layer
    "self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
    "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64), "mlp.down_proj": (64, 128),
}
GPT2_CONV1D = {"attn.c_attn": (192, 64), "attn.c_proj": (64, 64), "mlp.c_fc": (256, 64), "mlp.c_proj": (64, 256)}


def all_tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def test_dense_folder_exact_numbers(tiny_model_dir):
    folder = tiny_model_dir("llama")
    tensors = all_tensors(folder)
    result = inspect_folder(folder)
    assert [(layer["block"], layer["name"]) for layer in result["layers"]] == [
        (block, name) for block in range(3) for name in LLAMA_LINEARS
    ]
    for layer in result["layers"]:
        weight = tensors[f"model.layers.{layer['block']}.{layer['name']}.weight"]
        assert tuple(layer["shape"]) == LLAMA_LINEARS[layer["name"]] == tuple(weight.shape)
        assert layer["numel"] == weight.numel()
        assert layer["zeros"] == int((weight == 0).sum()) == 0
    per_block = sum(out * inp for out, inp in LLAMA_LINEARS.values())  # 36,864
    assert [block["numel"] for block in result["blocks"]] == [per_block] * 3
    assert result["total"] == {"layers": 21, "numel": 3 * per_block, "zeros": 0, "sparsity": 0.0}
    # tied head: embed_tokens and the final norm are the only tensors outside the blocks
    assert result["outside_blocks"]["tensors"] == 2


def test_pruned_folder_exact_numbers(finished_job):
    job, report = finished_job("llama", "wanda", "unstructured", 0.5)
    tensors = all_tensors(job.out)
    result = inspect_folder(job.out)
    for layer in result["layers"]:
        weight = tensors[layer["key"]]
        assert layer["zeros"] == int((weight == 0).sum()) == layer["numel"] // 2  # 50% of every row
        assert layer["sparsity"] == 0.5
        assert layer["sparsity"] == report["blocks"][layer["block"]]["sparsity"][layer["name"]]
    assert result["total"]["zeros"] == result["total"]["numel"] // 2 == 3 * 36_864 // 2


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_nm_compliance_true_for_2of4_output(finished_job, arch):
    job, _ = finished_job(arch, "sparsegpt", "2:4", None)
    result = inspect_folder(job.out, nm="2:4")
    assert result["total"]["nm_compliant"] is True
    assert all(layer["nm_compliant"] and layer["nm_violations"] == 0 for layer in result["layers"])
    assert result["total"]["sparsity"] == 0.5
    if arch == "gpt2":  # Conv1D: reported as (out, in) although stored (in, out)
        shapes = {layer["name"]: tuple(layer["shape"]) for layer in result["layers"] if layer["block"] == 0}
        assert shapes == GPT2_CONV1D
        stored = all_tensors(job.out)["transformer.h.0.attn.c_attn.weight"]
        assert tuple(stored.shape) == (64, 192)
        groups = (stored != 0).reshape(16, 4, 192).sum(dim=1)  # groups of 4 along the stored input axis (rows)
        assert int(groups.max()) <= 2


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_nm_compliance_false_for_unstructured(finished_job, arch):
    job, _ = finished_job(arch, "wanda", "unstructured", 0.5)
    result = inspect_folder(job.out, nm="2:4")
    assert result["total"]["nm_compliant"] is False
    assert result["total"]["nm_compliant_layers"] == 0
    assert all(layer["nm_violations"] > 0 for layer in result["layers"])


def test_count_layer_groups_along_the_input():
    weight = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0],
                           [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]])  # (out=2, in=8): row 0's second group has 3
    assert count_layer(weight, (2, 4)) == (9, False, 1)
    assert count_layer(weight, (3, 4)) == (9, True, 0)
    assert count_layer(weight[:, :6], (2, 4)) == (7, None, None)  # input not a multiple of M: n/a
    assert count_layer(weight, None) == (9, None, None)


def test_unknown_architecture_falls_back_to_tensor_names(tiny_model_dir, tmp_path):
    folder = tmp_path / "unknown"
    shutil.copytree(tiny_model_dir("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "not-a-transformers-model"
    (folder / "config.json").write_text(json.dumps(config))
    result = inspect_folder(folder)
    assert result["architecture"] == "layout guessed from tensor names"
    assert len(result["layers"]) == 21 and result["total"]["numel"] == 3 * 36_864


def test_cli_table_and_json(finished_job):
    job, _ = finished_job("gpt2", "sparsegpt", "2:4", None)
    runner = CliRunner()
    summary = runner.invoke(app, ["inspect", str(job.out), "--nm", "2:4"])
    assert summary.exit_code == 0, summary.output
    assert "attn.c_attn" not in summary.output and "(--layers: one row per layer)" in summary.output
    block_rows = [line.split()[0] for line in summary.output.splitlines() if "(block)" in line]
    assert block_rows == ["1", "2", "3"]  # one row per block, numbered from 1 as in the log and status
    assert "2:4 compliant: yes, every layer" in summary.output
    table = runner.invoke(app, ["inspect", str(job.out), "--nm", "2:4", "--layers"])
    assert table.exit_code == 0, table.output
    assert "attn.c_attn" in table.output and "192×64" in table.output
    assert len(table.output.splitlines()) > len(summary.output.splitlines())
    as_json = runner.invoke(app, ["inspect", str(job.out), "--nm", "2:4", "--json"])
    assert json.loads(as_json.stdout)["total"]["nm_compliant"] is True
    bad = runner.invoke(app, ["inspect", str(job.out), "--nm", "4:2"])
    assert bad.exit_code == 2 and "--nm" in bad.output
    missing = runner.invoke(app, ["inspect", str(job.out / "nope")])
    assert missing.exit_code == 2 and "not a folder" in missing.output
