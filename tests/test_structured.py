"""--pattern heads / channels: whole heads and MLP channels zeroed consistently across their linears."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import BLOCK_LISTS, make_job
from tolerances import gamma, inverse_rtol
from pruners.pattern import SparsityPattern
from pruners.structured import (
    ChannelGroups,
    HeadGroups,
    find_channel_groups,
    find_head_groups,
    select_structured,
    structured_count,
)
from reconstruct.jobs.run_job import run_job
from reconstruct.methods import ReconSpec

LLAMA_ORDER = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
               ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
# 9 query heads of 4, 3 key/value heads (SmolLM2's geometry), hidden 36, 20 MLP channels
GQA_SHAPES = {"self_attn.q_proj": (36, 36), "self_attn.k_proj": (12, 36), "self_attn.v_proj": (12, 36),
              "self_attn.o_proj": (36, 36), "mlp.gate_proj": (20, 36), "mlp.up_proj": (20, 36),
              "mlp.down_proj": (36, 20)}
GQA_CONFIG = SimpleNamespace(model_type="llama", num_attention_heads=9, num_key_value_heads=3, head_dim=4, hidden_size=36)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


# --------------------------------------------------------------------------- units
def test_parse_structured_patterns():
    heads = SparsityPattern.parse("heads", 0.2222)
    assert heads.structured and heads.kind == "heads" and heads.label == "heads 22%"
    assert SparsityPattern.parse("channels", None).sparsity == 0.5
    with pytest.raises(ValueError, match="'heads' or 'channels'"):
        SparsityPattern.parse("rows", 0.5)


def test_counts_round_to_whole_groups():
    assert structured_count(9, 0.2222) == 2  # "2 of 9 heads"
    assert structured_count(1536, 0.2) == 307
    assert structured_count(4, 0.125) == 1  # halves up


def test_roles_from_call_order_and_config():
    groups = find_head_groups(LLAMA_ORDER, GQA_SHAPES, GQA_CONFIG)
    assert groups == HeadGroups("self_attn.q_proj", ("self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj", 9, 3, 4)
    assert find_channel_groups(LLAMA_ORDER, GQA_SHAPES) == ChannelGroups(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", 20)


def test_fused_qkv_is_refused_for_heads():
    order = [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]]
    shapes = {"attn.c_attn": (192, 64), "attn.c_proj": (64, 64), "mlp.c_fc": (256, 64), "mlp.c_proj": (64, 256)}
    config = SimpleNamespace(model_type="gpt2", num_attention_heads=4, hidden_size=64)
    with pytest.raises(ValueError, match="fused.*c_attn"):
        find_head_groups(order, shapes, config)
    assert find_channel_groups(order, shapes).channels == 256  # channels work on GPT-2


def _gqa_importance(low_heads: list[int]) -> dict[str, torch.Tensor]:
    importance = {name: torch.ones(shape) for name, shape in GQA_SHAPES.items()}
    for head in low_heads:  # q rows and o columns of these heads matter little
        importance["self_attn.q_proj"][head * 4 : (head + 1) * 4] = 0.01
        importance["self_attn.o_proj"][:, head * 4 : (head + 1) * 4] = 0.01
    return importance


def test_gqa_prunes_query_heads_and_a_kv_head_only_when_all_its_queries_go():
    groups = find_head_groups(LLAMA_ORDER, GQA_SHAPES, GQA_CONFIG)
    pattern = SparsityPattern.parse("heads", 4 / 9)
    masks, removed = select_structured(pattern, groups, _gqa_importance([0, 1, 2, 5]))
    assert removed == {"heads": [0, 1, 2, 5], "kv_heads": [0]}  # query heads 0-2 share kv head 0; 5 shares kv 1
    q_rows_kept = masks["self_attn.q_proj"].all(dim=1).reshape(9, 4).all(dim=1)
    o_cols_kept = masks["self_attn.o_proj"].all(dim=0).reshape(9, 4).all(dim=1)
    assert torch.equal(q_rows_kept, o_cols_kept)
    assert q_rows_kept.tolist() == [False, False, False, True, True, False, True, True, True]
    for name in ("self_attn.k_proj", "self_attn.v_proj"):
        assert masks[name].all(dim=1).reshape(3, 4).all(dim=1).tolist() == [False, True, True]
    # whole rows / columns only
    assert ((masks["self_attn.q_proj"].sum(1) == 0) | (masks["self_attn.q_proj"].sum(1) == 36)).all()


def test_structured_selection_nests_in_an_earlier_cycle():
    groups = find_head_groups(LLAMA_ORDER, GQA_SHAPES, GQA_CONFIG)
    earlier, first = select_structured(SparsityPattern.parse("heads", 1 / 9), groups, _gqa_importance([7]))
    masks, removed = select_structured(SparsityPattern.parse("heads", 3 / 9), groups, _gqa_importance([0, 1, 2]), earlier)
    assert first["heads"] == [7] and set(removed["heads"]) == {7, 0, 1}  # 7 stays removed whatever its new score


# --------------------------------------------------------------------------- engine
def _output_tensors(out) -> dict[str, torch.Tensor]:
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(load_file(out / shard))
    return tensors


def _weight(tensors, arch: str, index: int, name: str) -> torch.Tensor:
    weight = tensors[f"{BLOCK_LISTS[arch]}.{index}.{name}.weight"]
    return weight.t() if arch == "gpt2" else weight  # Conv1D stores (in, out)


def _zero_row_groups(weight: torch.Tensor, size: int) -> list[int]:
    rows = (weight == 0).all(dim=1).reshape(-1, size)
    assert (rows.all(dim=1) | ~rows.any(dim=1)).all(), "a group is only partly zero"
    return torch.nonzero(rows.all(dim=1)).flatten().tolist()


def _zero_column_groups(weight: torch.Tensor, size: int) -> list[int]:
    return _zero_row_groups(weight.t(), size)


@pytest.mark.parametrize(
    "arch,pruner,method",
    [("llama", "wanda", "masklora"), ("opt", "sparsegpt", "none"), ("qwen2", "magnitude", "bias"),
     ("llama", "loraprune", "none")],
)
def test_heads_are_zeroed_across_q_k_v_o(tiny_model_dir, small_calib_file, tmp_path, arch, pruner, method):
    folder = tiny_model_dir(arch)
    recon = ReconSpec(method=method, steps=3)
    job = make_job(folder, tmp_path / "out", pruner, "heads", 0.5, calib=small_calib_file, recon=recon)
    report = run_job(job)
    tensors = _output_tensors(job.out)
    config = AutoModelForCausalLM.from_pretrained(job.out).config  # loadable
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    out_name = "self_attn.out_proj" if arch == "opt" else "self_attn.o_proj"
    mlp = ("fc1", "fc2") if arch == "opt" else ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    for block in report["blocks"]:
        i, removed = block["index"], block["removed"]
        assert len(removed["heads"]) == structured_count(heads, 0.5)
        assert _zero_row_groups(_weight(tensors, arch, i, "self_attn.q_proj"), head_dim) == removed["heads"]
        assert _zero_column_groups(_weight(tensors, arch, i, out_name), head_dim) == removed["heads"]
        share = heads // kv_heads
        expected_kv = [g for g in range(kv_heads) if all(h in removed["heads"] for h in range(g * share, (g + 1) * share))]
        assert removed["kv_heads"] == expected_kv
        for name in ("self_attn.k_proj", "self_attn.v_proj"):
            assert _zero_row_groups(_weight(tensors, arch, i, name), head_dim) == expected_kv
        for name in mlp:  # heads leave the MLP dense
            assert block["sparsity"][name] == 0.0


@pytest.mark.parametrize(
    "arch,pruner,method", [("opt", "wanda", "none"), ("gpt2", "wanda", "masklora"), ("llama", "loraprune", "masklora")]
)
def test_channels_zero_up_rows_and_down_columns(tiny_model_dir, small_calib_file, tmp_path, arch, pruner, method):
    job = make_job(tiny_model_dir(arch), tmp_path / "out", pruner, "channels", 0.25, calib=small_calib_file,
                   recon=ReconSpec(method=method, steps=3))
    report = run_job(job)
    tensors = _output_tensors(job.out)
    up, down = {"opt": (["fc1"], "fc2"), "gpt2": (["mlp.c_fc"], "mlp.c_proj"),
                "llama": (["mlp.gate_proj", "mlp.up_proj"], "mlp.down_proj")}[arch]
    for block in report["blocks"]:
        channels = block["removed"]["channels"]
        width = _weight(tensors, arch, block["index"], down).shape[1]
        assert len(channels) == structured_count(width, 0.25) == width // 4
        for name in up:
            assert _zero_row_groups(_weight(tensors, arch, block["index"], name), 1) == channels
        assert _zero_column_groups(_weight(tensors, arch, block["index"], down), 1) == channels
        assert all(value == 0.0 for name, value in block["sparsity"].items() if "attn" in name)
    model = AutoModelForCausalLM.from_pretrained(job.out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9, 3]])).logits).all()


def test_heads_on_gpt2_are_refused_before_anything_is_written(tiny_model_dir, small_calib_file, tmp_path):
    job = make_job(tiny_model_dir("gpt2"), tmp_path / "out", "wanda", "heads", 0.25, calib=small_calib_file)
    with pytest.raises(ValueError, match="--pattern heads.*c_attn"):
        run_job(job)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
def test_layer_pruners_give_element_importance(name):
    from pruners import get_pruner

    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(6, 10, generator=generator), torch.randn(50, 10, generator=generator)
    pruner = get_pruner(name)
    stats = pruner.new_stats(10, "cpu")
    if stats is not None:
        stats.add_batch(x)
    importance = pruner.importance(weight, stats)
    assert importance.shape == weight.shape and (importance >= 0).all()
    if name == "sparsegpt":  # OBS saliency w^2 / [H^-1]_jj with the damped H = 2 X^T X / n
        h = 2 * x.double().T @ x.double() / 50
        h += 0.01 * h.diagonal().mean() * torch.eye(10, dtype=torch.float64)
        expected = weight.double() ** 2 / torch.linalg.inv(h).diagonal()
        # float32 Cholesky inverse against the float64 one: its relative error, then one square and one division
        assert torch.allclose(importance.double(), expected, rtol=inverse_rtol(h) + gamma(2), atol=0)
