"""Reconstruction granularity (block / sublayer / linear) and target (dense / local) in the engine."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn
from safetensors import safe_open

from pruners.pattern import SparsityPattern
from reconstruct.config import CalibSpec, JobConfig, PruneSpec
from reconstruct.jobs.run_job import run_job
from reconstruct.methods import ReconSpec
from reconstruct.loop.objective import build_units, discover_units, starting_at_input_norms

LLAMA_ORDER = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"],
]
OPT_ORDER = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"], ["fc2"]]


def test_sublayer_units_use_the_modules_that_hold_them():
    units = discover_units("sublayer", LLAMA_ORDER)
    assert [(u.name, u.entries, u.exit) for u in units] == [
        ("attention", ("self_attn",), "self_attn"), ("mlp", ("mlp",), "mlp"),
    ]


def test_sublayer_units_without_an_mlp_module_span_first_to_last_linear():
    units = discover_units("sublayer", OPT_ORDER)
    assert [(u.name, u.entries, u.exit) for u in units] == [
        ("attention", ("self_attn",), "self_attn"), ("mlp", ("fc1",), "fc2"),
    ]


def test_linear_units_follow_execution_order():
    assert [u.name for u in discover_units("linear", OPT_ORDER)] == [n for g in OPT_ORDER for n in g]


def test_unknown_granularity_is_a_user_error():
    with pytest.raises(ValueError, match="--granularity"):
        discover_units("head", LLAMA_ORDER)


def _keep_masks(folder):
    masks = {}
    with safe_open(folder / "model-00001-of-00004.safetensors", framework="pt") as handle:
        for key in handle.keys():
            if key.endswith("proj.weight") or key.endswith("fc1.weight") or key.endswith("fc2.weight"):
                masks[key] = handle.get_tensor(key) != 0
    return masks


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("granularity,target", [("sublayer", "dense"), ("linear", "local")])
def test_unit_reconstruction_lowers_block_error_and_keeps_zeros(tiny_model_dir, small_calib_file, tmp_path, arch,
                                                                 granularity, target):
    torch.set_num_threads(1)
    folder = tiny_model_dir(arch)

    def job(method, out):
        return JobConfig(
            model=str(folder), out=tmp_path / out,
            prune=PruneSpec(pruner="wanda", pattern=SparsityPattern.parse("unstructured", 0.6)),
            calib=CalibSpec(source=str(small_calib_file), n_samples=8, seq_len=32, seed=0),
            recon=ReconSpec(method=method, steps=30, batch_size=2, micro_batch=2, lr=2e-3,
                            granularity=granularity, target=target),
            device="cpu", micro_batch=4, track_error=method == "none",  # the baseline's error is measured too
            model_check="off",  # the loop's repairs are what is tested (the check could revert them)
        )

    pruned = run_job(job("none", "none"))
    repaired = run_job(job("masklora", "masklora"))
    first_block_error = [b["mse_after"] for b in repaired["blocks"]][0]
    assert first_block_error < pruned["blocks"][0]["mse_after"]
    if arch != "gpt2":  # GPT-2's Conv1D names differ; the zero pattern is checked for the others here
        assert _keep_masks(tmp_path / "none").keys() == _keep_masks(tmp_path / "masklora").keys()
        for key, mask in _keep_masks(tmp_path / "none").items():
            assert torch.equal(mask, _keep_masks(tmp_path / "masklora")[key]), key
    report = json.loads((tmp_path / "masklora" / "reconstruct.json").read_text())
    assert report["job"]["method"]["granularity"] == granularity



class TinyAttention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.o_proj = (nn.Linear(width, width) for _ in range(3))

    def forward(self, normed: torch.Tensor) -> torch.Tensor:  # (b, T, W) → (b, T, W)
        return self.o_proj(self.q_proj(normed) * self.k_proj(normed))


class TinyMLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, normed: torch.Tensor) -> torch.Tensor:  # (b, T, W) → (b, T, W)
        return self.down(torch.relu(self.up(normed)))


class PreNormBlock(nn.Module):
    """``x + attn(norm1(x))`` then ``+ mlp(norm2(.))``: the shape of LLaMA/OPT/GPT-2 blocks, in miniature."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn, self.mlp = TinyAttention(width), TinyMLP(width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.attn(self.norm1(hidden))
        return hidden + self.mlp(self.norm2(hidden))


PRE_NORM_ORDER = [["attn.q_proj", "attn.k_proj"], ["attn.o_proj"], ["mlp.up"], ["mlp.down"]]


LINEAR_UNITS = [(name, (name,), name) for group in PRE_NORM_ORDER for name in group]


@pytest.mark.parametrize("granularity,expected", [
    ("block", [("block", ("",), "")]),
    ("sublayer", [("attention", ("norm1",), "attn"), ("mlp", ("norm2",), "mlp")]),
    ("linear", LINEAR_UNITS),  # a linear unit is the linear alone
])
def test_sublayer_units_start_at_the_norm_that_feeds_them(granularity, expected):
    units = build_units(granularity, PRE_NORM_ORDER, PreNormBlock(), lambda module, x: module(x), torch.randn(2, 3, 8))
    assert [(u.name, u.entries, u.exit) for u in units] == expected


def test_entries_move_to_a_norm_only_when_they_read_its_output():
    units = discover_units("linear", PRE_NORM_ORDER)
    moved = starting_at_input_norms(units, PreNormBlock(), lambda module, x: module(x), torch.randn(2, 3, 8))
    assert [u.entries for u in moved] == [("norm1",), ("norm1",), ("attn.o_proj",), ("norm2",), ("mlp.down",)]


def _norm_weights(folder):
    weights = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as handle:
            weights.update({key: handle.get_tensor(key) for key in handle.keys()
                            if ("norm" in key or ".ln_" in key) and key.endswith("weight")})
    return weights


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_sublayer_reconstruction_trains_the_norms_of_its_blocks(tiny_model_dir, small_calib_file, tmp_path, arch):
    torch.set_num_threads(1)
    folder = tiny_model_dir(arch)
    run_job(JobConfig(
        model=str(folder), out=tmp_path / "out",
        prune=PruneSpec(pruner="wanda", pattern=SparsityPattern.parse("unstructured", 0.6)),
        calib=CalibSpec(source=str(small_calib_file), n_samples=4, seq_len=16, seed=0),
        recon=ReconSpec(method="ln", steps=4, batch_size=2, micro_batch=2, lr=1e-2, granularity="sublayer"),
        device="cpu", micro_batch=4, model_check="off",  # the loop's training is tested (the check could revert it)
    ))
    before, after = _norm_weights(folder), _norm_weights(tmp_path / "out")
    block_norms = [key for key in before if re.search(r"\.(layers|h)\.\d+\.", key)]
    assert len(block_norms) == 2 * 3  # two per block, three blocks
    for key in block_norms:
        assert not torch.equal(before[key], after[key]), f"{key} was not trained"
