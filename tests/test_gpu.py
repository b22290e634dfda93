"""The CUDA path end to end on tiny models: exact sparsity, masks as on CPU, zeros that survive, tiers, resume.

Marked ``gpu`` (deselected by default: CI has no GPU). Run with ``python -m pytest -m gpu``. Every job
runs in-process through the engine; the CPU runs of the same jobs are the reference.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import make_job
from test_engine_output import linear_weight_keys, output_tensors

from pruners.pattern import SparsityPattern
from reconstruct.faults import CRASH_ENV
from reconstruct.methods.spec import ReconSpec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

REPO = Path(__file__).resolve().parents[1]
ARCH = "llama"
PRUNERS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = (("unstructured", 0.5), ("2:4", None))
METHODS = ("bias-ln", "masklora", "scalelora")  # lora densifies by design: not zero-preserving
# Wanda and SparseGPT statistics are float32 sums in a different order on the GPU: a weight whose
# score ties its neighbour's to rounding may land on the other side of the cut. Magnitude has no
# statistics and must agree exactly.
MIN_MASK_AGREEMENT = 0.99


def run(job):
    from reconstruct.jobs.run_job import run_job

    return run_job(job)


def linear_weights(job, model_dir: Path) -> dict[str, torch.Tensor]:
    """Every prunable linear weight of the job's output, as (out, in)."""
    tensors = output_tensors(job.out)
    return {key: (tensors[key].T if conv1d else tensors[key]) for key, conv1d in linear_weight_keys(model_dir, ARCH).items()}


def assert_exact_pattern(weights: dict[str, torch.Tensor], pattern: SparsityPattern) -> None:
    """Every row (unstructured) or every group of M along the input (N:M) has exactly the pattern's zeros."""
    for key, weight in weights.items():
        zeros = weight == 0  # (out, in)
        if pattern.kind == "nm":
            groups = zeros.reshape(weight.shape[0], -1, pattern.m)  # (out, in / M, M)
            assert (groups.sum(-1) == pattern.m - pattern.n).all(), key
        else:
            want = int(pattern.sparsity * weight.shape[1])
            assert (zeros.sum(1) == want).all(), key


@pytest.mark.parametrize("pruner", PRUNERS)
@pytest.mark.parametrize("pattern_name,sparsity", PATTERNS)
def test_cuda_prune_is_exact_and_matches_cpu(tiny_model_dir, small_calib_file, tmp_path, pruner, pattern_name, sparsity):
    model = tiny_model_dir(ARCH)
    cpu_job = make_job(model, tmp_path / "cpu", pruner, pattern_name, sparsity, calib=small_calib_file)
    cuda_job = replace(cpu_job, out=tmp_path / "cuda", device="cuda")
    run(cpu_job)
    report = run(cuda_job)
    assert report["peak_gpu_mb"] > 0
    cpu, cuda = linear_weights(cpu_job, model), linear_weights(cuda_job, model)
    assert_exact_pattern(cuda, cpu_job.prune.pattern)
    agree = sum(((cpu[k] == 0) == (cuda[k] == 0)).sum().item() for k in cpu) / sum(w.numel() for w in cpu.values())
    if pruner == "magnitude":
        assert agree == 1.0
    else:
        assert agree >= MIN_MASK_AGREEMENT, agree
    both_kept = {k: (cpu[k] != 0) & (cuda[k] != 0) for k in cpu}
    kept_error = sum(((cuda[k] - cpu[k]) * both_kept[k]).norm() ** 2 for k in cpu) ** 0.5
    # not a rounding bound: a mask decision that flips (allowed above) changes the next blocks' inputs, so the
    # two devices' weights differ by more than rounding; 1% of the weights' norm says the updates still agree
    assert kept_error <= 1e-2 * sum(w.norm() ** 2 for w in cpu.values()) ** 0.5


@pytest.mark.parametrize("method", METHODS)
def test_cuda_reconstruction_keeps_every_zero_and_lowers_the_error(tiny_model_dir, small_calib_file, tmp_path, method):
    model = tiny_model_dir(ARCH)
    base = make_job(model, tmp_path / "none", "wanda", "unstructured", 0.5, calib=small_calib_file)
    base = replace(base, device="cuda", track_error=True)  # the pruned-only baseline's error is measured too
    repaired_job = replace(base, out=tmp_path / method, recon=ReconSpec(method=method, steps=16))
    plain = run(base)
    repaired = run(repaired_job)
    pruned, merged = linear_weights(base, model), linear_weights(repaired_job, model)
    assert_exact_pattern(merged, base.prune.pattern)  # a merge that refilled a zero would break a row's count
    for key in pruned:
        assert torch.isfinite(merged[key]).all(), key
        if key.startswith("model.layers.0."):  # block 0 sees the same inputs in both jobs: the same mask
            assert torch.equal(merged[key] == 0, pruned[key] == 0), key
    plain_mse = [block["mse_after"] for block in plain["blocks"]]
    repaired_mse = [block["mse_after"] for block in repaired["blocks"]]
    assert sum(repaired_mse) < sum(plain_mse), (plain_mse, repaired_mse)


def test_cuda_offload_tiers_write_the_same_bytes(tiny_model_dir, small_calib_file, tmp_path):
    model = tiny_model_dir(ARCH)
    job = make_job(model, tmp_path / "device", "sparsegpt", "2:4", calib=small_calib_file,
                   recon=ReconSpec(method="bias-ln", steps=4))
    job = replace(job, device="cuda", offload="device")
    outputs = {}
    for tier in ("device", "cpu", "disk"):
        tier_job = replace(job, out=tmp_path / tier, offload=tier)
        run(tier_job)
        outputs[tier] = {p.name: p.read_bytes() for p in sorted(tier_job.out.glob("model-*.safetensors"))}
    assert outputs["device"] and outputs["device"] == outputs["cpu"] == outputs["disk"]



@pytest.mark.parametrize("tier", ["device", "cpu"])
def test_cuda_overlap_on_and_off_write_the_same_bytes(tiny_model_dir, small_calib_file, tmp_path, tier):
    """Reads into pinned host memory ahead of the block, writes behind it: the serial order's bytes."""
    model = tiny_model_dir(ARCH)
    job = make_job(model, tmp_path / "on", "wanda", calib=small_calib_file, recon=ReconSpec(method="masklora", steps=4))
    job = replace(job, device="cuda", offload=tier, checkpoint_every=1)
    outputs = {}
    for overlap in (True, False):
        mode_job = replace(job, out=tmp_path / str(overlap), overlap=overlap)
        run(mode_job)
        outputs[overlap] = {p.name: p.read_bytes() for p in sorted(mode_job.out.glob("model-*.safetensors"))}
    assert outputs[True] and outputs[True] == outputs[False]

def test_cuda_resume_after_a_kill_is_bit_identical(tiny_model_dir, small_calib_file, tmp_path):
    model = tiny_model_dir(ARCH)

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "reconstruct", "run", "--model", str(model), "--calib", str(small_calib_file),
                "--out", str(out), "--device", "cuda", "--pruner", "sparsegpt", "--sparsity", "0.5",
                "--method", "masklora", "--recon-steps", "4", "--n-samples", "8", "--seq-len", "32"]

    env = {**os.environ, "TQDM_DISABLE": "1"}
    env.pop(CRASH_ENV, None)
    reference = subprocess.run(command(tmp_path / "ref"), cwd=REPO, env=env, capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr
    crashed = subprocess.run(command(tmp_path / "job"), cwd=REPO, env={**env, CRASH_ENV: "reconstruction:1"},
                             capture_output=True, text=True)
    assert crashed.returncode != 0
    resumed = subprocess.run(command(tmp_path / "job"), cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    for shard in sorted((tmp_path / "ref").glob("model-*.safetensors")):
        assert (tmp_path / "job" / shard.name).read_bytes() == shard.read_bytes(), shard.name
