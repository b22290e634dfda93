"""LoRAPrune: LoRA-guided importance from a per-block warm-up, exact masks, the block left untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from conftest import BLOCK_LISTS, make_job
from pruners import get_pruner
from pruners.base import BlockTraining, GivenScores
from pruners.loraprune import (
    ImportanceEMA,
    LoRAPrunePruner,
    lora_gradient_estimate,
    lora_guided_importance,
    provisional_events,
)
from pruners.masks import select_keep_mask
from pruners.pattern import SparsityPattern
from reconstruct.jobs.run_job import run_job
from reconstruct.methods import ReconSpec, block_trainer
from tolerances import assert_within, gamma


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


# --------------------------------------------------------------------------- the criterion
def test_gradient_estimate_is_the_change_of_ba_after_a_unit_step():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, generator=generator), torch.randn(4, 3, generator=generator)
    ga, gb = torch.randn(3, 5, generator=generator), torch.randn(4, 3, generator=generator)
    estimate = lora_gradient_estimate(a, b, ga, gb)
    assert torch.equal(estimate, gb @ a + b @ ga - gb @ ga)  # the same expression, the same kernels: same bits
    # -(new BA - BA), another expression: on any path at most r + 4 roundings (sums of r = 3 products, two input
    # subtractions, two combinations), relative to terms whose absolute values sum to at most 2 (|b|+|gb|)(|a|+|ga|)
    rank = a.shape[0]
    scale = (b.double().abs() + gb.double().abs()) @ (a.double().abs() + ga.double().abs())  # (out, in)
    assert_within(estimate, b @ a - (b - gb) @ (a - ga), 3 * gamma(rank + 4) * scale)


def test_importance_ema_starts_at_zero_and_decays():
    ema = ImportanceEMA({"w": (1, 2)}, "cpu")
    ema.update("w", torch.tensor([[1.0, 2.0]]))
    ema.update("w", torch.tensor([[1.0, 0.0]]))
    expected = torch.tensor([[0.9 * 0.1 + 0.1, 0.9 * 0.2]], dtype=torch.float64)
    # non-negative terms: six float32 roundings (0.9 and 1 - 0.9 as float32, a product in step one, two products
    # and a sum in step two) and two float64 ones in the expected value: within gamma_8 of each other
    assert_within(ema.values["w"], expected, gamma(8) * expected)
    weight, gradient = torch.tensor([[2.0, -1.0]]), torch.tensor([[0.5, 3.0]])
    assert torch.equal(lora_guided_importance(weight, gradient), torch.tensor([[1.0, 3.0]]))


def test_provisional_events_ramp_inside_the_warm_up():
    assert provisional_events(20, 4) == {5: 0.25, 10: 0.5, 15: 0.75}
    assert provisional_events(20, 1) == {0: 1.0}


def test_options_and_given_scores():
    pruner = get_pruner("loraprune", loraprune_steps=7, loraprune_rank=4, loraprune_lr=1e-3, blocksize=64)
    assert pruner.options == {"loraprune_steps": 7, "loraprune_rank": 4, "loraprune_lr": 1e-3}
    assert pruner.needs_block_training and not pruner.needs_calibration
    with pytest.raises(ValueError, match="--loraprune-lr"):
        get_pruner("loraprune", loraprune_lr=0.0)
    scores = torch.rand(4, 8)
    weight = torch.randn(4, 8)
    new_weight, keep = pruner.prune(weight.clone(), GivenScores(scores), SparsityPattern.parse("2:4", None))
    assert torch.equal(keep, select_keep_mask(scores, SparsityPattern.parse("2:4", None)))
    assert not new_weight[~keep].any()
    with pytest.raises(ValueError, match="GivenScores"):
        pruner.prune(weight, None, SparsityPattern.parse("unstructured", 0.5))


class _Stream:
    def __init__(self, data: torch.Tensor) -> None:
        self.data, self.n_samples = data, data.shape[0]

    def read(self, indices):
        return self.data[indices]


def test_score_block_trains_on_the_block_and_leaves_it_exactly_as_it_was():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    for param in block.parameters():
        param.requires_grad_(False)
    before = copy.deepcopy(block.state_dict())
    linears = {"0": block[0], "2": block[2]}
    inputs = _Stream(torch.randn(4, 3, 8))
    targets = _Stream(block(inputs.data) + 0.1 * torch.randn(4, 3, 8))  # the block misses its targets a little
    pattern = SparsityPattern.parse("unstructured", 0.5)
    chosen: list[float] = []

    def select_masks(scores, fraction, within):
        chosen.append(fraction)
        return {n: select_keep_mask(s, SparsityPattern.parse("unstructured", 0.5 * fraction), within.get(n))
                for n, s in scores.items()}

    training = BlockTraining(
        block=block, linears=linears, keep_masks={n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in linears.items()},
        forward=block, inputs=inputs, targets=targets, seed=3, micro_batch=2, select_masks=select_masks,
        train=block_trainer(block, inputs, targets, seed=3, eval_micro_batch=2),
    )
    pruner = LoRAPrunePruner(loraprune_steps=8, loraprune_rank=2)
    scores = pruner.score_block(training)
    assert chosen == [0.25, 0.5, 0.75]  # provisional pruning inside the warm-up
    assert block[0] is linears["0"] and block[2] is linears["2"]  # adapters removed
    for key, value in block.state_dict().items():
        assert torch.equal(value, before[key]), key
    for name, module in linears.items():
        assert scores[name].shape == module.weight.shape and (scores[name] >= 0).all() and scores[name].any()
        _, keep = pruner.prune(module.weight.clone(), GivenScores(scores[name]), pattern)
        assert ((~keep).sum(1) == module.weight.shape[1] // 2).all()


# --------------------------------------------------------------------------- in the engine
@pytest.mark.parametrize(
    "arch,pattern,sparsity,method",
    [("llama", "unstructured", 0.5, "none"), ("llama", "2:4", None, "masklora"), ("opt", "unstructured", 0.6, "masklora")],
)
def test_loraprune_meets_the_pattern_exactly(tiny_model_dir, small_calib_file, tmp_path, arch, pattern, sparsity, method):
    from dataclasses import replace

    job = make_job(tiny_model_dir(arch), tmp_path / "out", "loraprune", pattern, sparsity, calib=small_calib_file,
                   recon=ReconSpec(method=method, steps=3))
    job = replace(job, prune=replace(job.prune, loraprune_steps=8))
    report = run_job(job)
    from safetensors import safe_open

    checked = 0
    for block in report["blocks"]:
        shard = job.out / f"model-{block['index'] + 1:05d}-of-{len(report['blocks']) + 1:05d}.safetensors"
        with safe_open(shard, framework="pt") as handle:
            prefix = f"{BLOCK_LISTS[arch]}.{block['index']}."
            for key in handle.keys():
                name = key.removeprefix(prefix).removesuffix(".weight")
                if name not in block["sparsity"]:
                    continue
                zero = handle.get_tensor(key) == 0  # (out, in): nn.Linear in llama/opt
                if pattern == "2:4":
                    assert (zero.reshape(zero.shape[0], -1, 4).sum(-1) == 2).all(), key
                else:
                    assert (zero.sum(1) == int(zero.shape[1] * sparsity)).all(), key
                checked += 1
    assert checked == sum(len(b["sparsity"]) for b in report["blocks"])
    assert report["job"]["loraprune"] == {"steps": 8, "rank": 8, "lr": 2e-2}


def test_block_zero_does_not_prune_by_column_index(tiny_model_dir, small_calib_file, tmp_path):
    """Block 0 reproduces its targets exactly before pruning (zero gradient): the magnitude fallback ranks."""
    job = make_job(tiny_model_dir("llama"), tmp_path / "out", "loraprune", "unstructured", 0.5, calib=small_calib_file)
    run_job(job)
    from safetensors import safe_open

    with safe_open(job.out / "model-00001-of-00004.safetensors", framework="pt") as handle:
        weight = handle.get_tensor("model.layers.0.mlp.down_proj.weight")
    first_half = torch.zeros_like(weight, dtype=torch.bool)
    first_half[:, : weight.shape[1] // 2] = True
    assert not torch.equal(weight == 0, first_half)


def test_cli_rejects_a_bad_loraprune_option_with_exit_code_2(tiny_model_dir, tmp_path):
    from cli import app

    result = CliRunner().invoke(app, [
        "run", "--model", str(tiny_model_dir("llama")), "--pruner", "loraprune", "--loraprune-lr", "0",
        "--out", str(tmp_path / "out"), "--device", "cpu", "--n-samples", "2", "--seq-len", "8",
    ])
    assert result.exit_code == 2
    assert "--loraprune-lr" in result.output
    assert not (tmp_path / "out").exists()


def test_pruners_import_nothing_from_reconstruct():
    """The arrow points one way: the engine hands pruners what they need (``BlockTraining.train``)."""
    import ast
    from pathlib import Path

    for path in sorted((Path(__file__).parents[1] / "pruners").glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        assert not [name for name in imported if name.split(".")[0] == "reconstruct"], path.name


def test_one_adapter_class_for_reconstruction_and_loraprune():
    from pruners.loraprune import attach_scoring_adapters, detach_scoring_adapters
    from pruners.lowrank import LowRankLinear
    from reconstruct.methods import attach_method

    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    keep = {n: torch.ones_like(block[int(n)].weight, dtype=torch.bool) for n in ("0", "2")}
    linears = {"0": block[0], "2": block[2]}
    scoring = attach_scoring_adapters(block, linears, keep, rank=4, seed=5)
    assert all(type(wrapper) is LowRankLinear and wrapper.provisional for wrapper in scoring.values())
    scoring_a = {name: wrapper.lora_A.detach().clone() for name, wrapper in scoring.items()}
    detach_scoring_adapters(block, scoring)
    handle = attach_method("lora", block, linears, keep, rank=4, alpha=8.0, bias_linears=set(), seed=5)
    for name, wrapper in handle.wrappers.items():
        assert type(wrapper) is LowRankLinear
        assert torch.equal(wrapper.lora_A, scoring_a[name])  # one init, one per-layer seed
