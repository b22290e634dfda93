"""The output folder of a finished job: loadable, exactly sparse, untouched elsewhere, reported, idempotent.

Every test runs over one case table (architecture × pruner × pattern). The jobs run in-process on CPU
once per session (``finished_job`` in conftest) and each test inspects a different property of the
same output folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from conftest import BLOCK_LISTS, CORE_ARCHITECTURES, VOCAB_SIZE

PRUNERS = ("magnitude", "wanda", "sparsegpt")
INDEX_NAME = "model.safetensors.index.json"
REPORT_NAME = "reconstruct.json"

# (arch, pruner, pattern, sparsity, scope): the full pruner × pattern grid on the core architectures,
# one pruner per extra architecture, and higher sparsity / layer scope on one architecture.
CASES = [
    *[(arch, pruner, "unstructured", 0.5, "row") for arch in CORE_ARCHITECTURES for pruner in PRUNERS],
    *[(arch, pruner, "2:4", None, "row") for arch in CORE_ARCHITECTURES for pruner in PRUNERS],
    ("mistral", "wanda", "unstructured", 0.5, "row"),
    ("mistral", "wanda", "2:4", None, "row"),
    ("qwen2", "sparsegpt", "unstructured", 0.5, "row"),
    ("qwen2", "sparsegpt", "2:4", None, "row"),
    ("llama", "sparsegpt", "unstructured", 0.7, "row"),
    ("llama", "wanda", "unstructured", 0.7, "layer"),
    ("llama", "sparsegpt", "unstructured", 0.5, "layer"),
]


def case_id(case: tuple) -> str:
    arch, pruner, pattern, sparsity, scope = case
    shape = pattern if pattern != "unstructured" else f"s{sparsity}-{scope}"
    return f"{arch}-{pruner}-{shape}"


cases = pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])


# --------------------------------------------------------------------------- helpers
def input_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the tiny input checkpoint (one safetensors file)."""
    return load_file(model_dir / "model.safetensors")


def output_tensors(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the output folder, found through its index."""
    weight_map = json.loads((out / INDEX_NAME).read_text())["weight_map"]
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(set(weight_map.values())):
        tensors.update(load_file(out / file))
    return tensors


def prunable_linears(model_dir: Path, arch: str) -> tuple[int, dict[str, bool]]:
    """``(n_blocks, {linear name relative to a block: is_conv1d})`` from a meta skeleton of the model."""
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    blocks = skeleton.get_submodule(BLOCK_LISTS[arch])
    linears = {
        name: isinstance(module, Conv1D)
        for name, module in blocks[0].named_modules()
        if isinstance(module, (nn.Linear, Conv1D))
    }
    assert linears, "the test's own enumeration found no linears"
    return len(blocks), linears


def linear_weight_keys(model_dir: Path, arch: str) -> dict[str, bool]:
    """Full state-dict key of every prunable linear weight in every block → stored as Conv1D (in, out)."""
    n_blocks, linears = prunable_linears(model_dir, arch)
    return {
        f"{BLOCK_LISTS[arch]}.{i}.{name}.weight": is_conv1d
        for i in range(n_blocks)
        for name, is_conv1d in linears.items()
    }


def file_times(out: Path) -> dict[str, tuple[int, int]]:
    """``relative path → (mtime_ns, size)`` for every file under ``out``."""
    return {
        str(path.relative_to(out)): (path.stat().st_mtime_ns, path.stat().st_size)
        for path in sorted(out.rglob("*"))
        if path.is_file()
    }


# --------------------------------------------------------------------------- tests
@cases
def test_output_folder_loads_and_runs_forward(finished_job, case):
    job, _ = finished_job(*case)
    model, info = AutoModelForCausalLM.from_pretrained(job.out, output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    model.eval()
    ids = torch.randint(0, VOCAB_SIZE, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # (2, 16, V)
    assert logits.shape == (2, 16, VOCAB_SIZE)
    assert torch.isfinite(logits).all()


@cases
def test_every_linear_has_exactly_the_requested_sparsity(finished_job, tiny_model_dir, case):
    arch, _, pattern_name, sparsity, scope = case
    job, _ = finished_job(*case)
    out = output_tensors(job.out)
    keys = linear_weight_keys(tiny_model_dir(arch), arch)
    for key, is_conv1d in keys.items():
        stored = out[key]
        weight = stored.t() if is_conv1d else stored  # (out, in)
        n_out, n_in = weight.shape
        zeros = weight == 0  # (out, in)
        if pattern_name != "unstructured":  # expectations from the case table itself, not the parsed job
            n, m = (int(part) for part in pattern_name.split(":"))
            assert n_in % m == 0
            per_group = zeros.reshape(n_out, n_in // m, m).sum(dim=2)  # (out, groups)
            assert (per_group == m - n).all(), f"{key}: zeros per {m}-group {per_group.unique().tolist()}"
        elif scope == "row":
            per_row = zeros.sum(dim=1)  # (out,)
            assert (per_row == int(n_in * sparsity)).all(), f"{key}: zeros per row {per_row.unique().tolist()}"
        else:
            assert int(zeros.sum()) == int(n_out * n_in * sparsity), key


@cases
def test_tensors_other_than_pruned_weights_are_bit_identical(finished_job, tiny_model_dir, case):
    """Embeddings, positions, final norm, head (if stored), and, with no reconstruction, block norms and biases."""
    arch, pruner, *_ = case
    job, _ = finished_job(*case)
    assert job.recon is None
    model_dir = tiny_model_dir(arch)
    before, after = input_tensors(model_dir), output_tensors(job.out)
    assert set(after) == set(before)
    pruned_keys = linear_weight_keys(model_dir, arch)
    block_prefix = BLOCK_LISTS[arch] + "."
    outside = [key for key in before if not key.startswith(block_prefix)]
    assert any("embed" in key or "wte" in key for key in outside)
    for key, tensor in before.items():
        if key in pruned_keys:
            continue
        assert after[key].dtype == tensor.dtype, key
        assert torch.equal(after[key], tensor), key
    if pruner in ("magnitude", "wanda"):  # mask-only pruners: the kept weights are untouched too
        for key in pruned_keys:
            keep = after[key] != 0
            assert after[key].dtype == before[key].dtype, key
            assert torch.equal(after[key][keep], before[key][keep]), key


@cases
def test_report_and_index_cover_every_block_and_tensor(finished_job, tiny_model_dir, case):
    arch, *_ = case
    job, returned = finished_job(*case)
    model_dir = tiny_model_dir(arch)
    n_blocks, linears = prunable_linears(model_dir, arch)

    report = json.loads((job.out / REPORT_NAME).read_text())
    assert len(report["blocks"]) == n_blocks
    for i, block in enumerate(report["blocks"]):
        assert block["index"] == i
        assert set(block["sparsity"]) == set(linears)
        # not a rounding tolerance: kept counts are whole weights per row (widths >= 64), and the reported
        # fraction is checked exactly against the stored zeros below
        assert all(abs(value - job.prune.pattern.sparsity) < 0.02 for value in block["sparsity"].values()), block
    out = output_tensors(job.out)
    for i, block in enumerate(report["blocks"]):  # the reported fractions are the stored ones
        for name, value in block["sparsity"].items():
            weight = out[f"{BLOCK_LISTS[arch]}.{i}.{name}.weight"]
            # both one correctly rounded division of the same two integers (< 2**53): exact
            assert value == float((weight == 0).sum()) / weight.numel()
    assert isinstance(report["peak_rss_mb"], (int, float)) and report["peak_rss_mb"] > 0
    assert "peak_gpu_mb" in report
    assert returned["blocks"] == report["blocks"]

    index = json.loads((job.out / INDEX_NAME).read_text())
    weight_map = index["weight_map"]
    assert set(weight_map) == set(input_tensors(model_dir))
    for key, file in weight_map.items():
        with safe_open(job.out / file, framework="pt") as handle:
            assert key in handle.keys(), (key, file)
    model = AutoModelForCausalLM.from_pretrained(job.out)
    head = model.get_output_embeddings()
    tied_head = head is not None and head.weight is model.get_input_embeddings().weight
    head_keys = {f"{name}.weight" for name, module in model.named_modules() if module is head}
    for key in model.state_dict():
        assert key in weight_map or (tied_head and key in head_keys), key
    total = sum(t.numel() * t.element_size() for t in out.values())
    assert index["metadata"]["total_size"] == total


@cases
def test_rerunning_a_finished_job_rewrites_nothing(finished_job, case):
    from reconstruct.jobs.run_job import run_job

    job, first = finished_job(*case)
    before = file_times(job.out)
    again = run_job(job)
    after = file_times(job.out)
    assert after == before
    assert again["blocks"] == first["blocks"]
    assert not os.path.exists(job.out / ".reconstruct" / "stream-sparse.bin")
