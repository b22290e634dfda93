"""An fp16 checkpoint computed in float32: what the report says about sparsity is what the file holds.

Weights are cast back to the checkpoint's dtype when written. A kept weight whose float32 value lies
below fp16's smallest subnormal (2**-24, about 6e-8) would round to 0 there: an extra zero the pruner
did not choose, invisible to a sparsity measured in float32. The fc1 weights of this model are scaled
to about 1e-6, so SparseGPT's updates of the kept weights land many of them in that range.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import TINY_CONFIGS, VOCAB_SIZE, WIKITEXT_VALID, build_word_tokenizer, make_job

FP16_SUBNORMAL = 2.0 ** -24


def save_fp16_opt(folder: Path) -> Path:
    """The tiny OPT with fc1 weights scaled by 1e-4, saved in float16."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS["opt"]())
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            layer.fc1.weight.mul_(1e-4)  # (128, 64), values ~ 2e-6: fp16 subnormals
    model.half().save_pretrained(folder)
    build_word_tokenizer(WIKITEXT_VALID, VOCAB_SIZE).save_pretrained(folder)
    return folder


def written_tensors(out: Path) -> dict[str, torch.Tensor]:
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(set(weight_map.values())):
        tensors.update(load_file(out / file))
    return tensors


def test_report_sparsity_is_the_written_files(tmp_path, small_calib_file):
    from reconstruct.jobs.run_job import run_job
    from reconstruct.methods import ReconSpec

    model = save_fp16_opt(tmp_path / "model")
    recon = ReconSpec(method="masklora", steps=2, lr=1e-9)  # trains, yet keeps fc1 at its tiny scale
    job = make_job(model, tmp_path / "out", "sparsegpt", sparsity=0.5, calib=small_calib_file, recon=recon)
    report = run_job(job)
    written = written_tensors(job.out)
    tiny_kept = 0
    for block in report["blocks"]:
        for name, reported in block["sparsity"].items():
            weight = written[f"model.decoder.layers.{block['index']}.{name}.weight"]  # (out, in)
            assert weight.dtype == torch.float16
            zeros = weight == 0
            assert reported == pytest.approx(float(zeros.sum()) / weight.numel(), abs=1e-12), name
            assert (zeros.sum(dim=1) == weight.shape[1] // 2).all(), f"{name}: zeros the pruner did not choose"
            tiny_kept += int((weight.abs() == FP16_SUBNORMAL).sum())
    assert tiny_kept > 0  # the case the test is about happened: kept weights at fp16's smallest subnormal


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16, torch.float32])
def test_kept_weights_stay_non_zero_in_the_stored_dtype(stored):
    from reconstruct.modelio.block_io import keep_nonzero_when_stored, smallest_subnormal, stored_sparsity

    guard = torch.finfo(torch.float32).tiny  # MaskLoRA's guard in a float32 block: 0 in float16
    weight = torch.tensor([[guard, -1e-9, 0.0, 0.0, 0.5, -2e-8]])  # (1, 6), float32 compute dtype
    keep = torch.tensor([[True, True, True, False, True, True]])  # kept exact 0 at 2, pruned at 3
    before = weight.clone()
    nudged = keep_nonzero_when_stored(weight, keep, stored)
    vanishing = keep & (before != 0) & (before.to(stored) == 0)
    assert nudged == int(vanishing.sum())
    assert nudged == {torch.float16: 3, torch.bfloat16: 0, torch.float32: 0}[stored]
    expected = torch.where(vanishing, torch.full_like(before, smallest_subnormal(stored)).copysign(before), before)
    assert torch.equal(weight, expected)
    assert (weight.to(stored) != 0).tolist() == [[True, True, False, False, True, True]]
    assert stored_sparsity(weight, stored) == 2 / 6  # the kept exact zero is reported, not nudged


def test_smallest_subnormal():
    from reconstruct.modelio.block_io import smallest_subnormal

    assert smallest_subnormal(torch.float16) == 2.0 ** -24
    assert smallest_subnormal(torch.bfloat16) == 2.0 ** -133
    assert smallest_subnormal(torch.float32) == 2.0 ** -149
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        value = torch.tensor(smallest_subnormal(dtype), dtype=dtype)
        assert value > 0 and torch.tensor(smallest_subnormal(dtype) / 2, dtype=torch.float64).to(dtype) == 0
