"""The streamed, block-at-a-time result equals a plain in-memory reference written here.

The reference loads the whole model with ``from_pretrained``, captures block 0's inputs and keyword
arguments with its own pre-hook, and then, block by block: collects the pruner's statistics from a
forward of the (pruned) stream, prunes every linear, and propagates the stream through the pruned
block. It uses the engine's micro-batches (``job.micro_batch``) so the float arithmetic is the same:
the same kernels on the same shapes, so masks and values must be identical bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from calib.text_sources import read_text, sample_windows, tokenize_text
from conftest import BLOCK_LISTS, CORE_ARCHITECTURES
from pruners import get_pruner

PRUNERS = ("magnitude", "wanda", "sparsegpt")
# Every pruner on unstructured 50%; N:M only for SparseGPT, the one pruner whose N:M path differs
# (groups chosen one by one during the OBS sweep, not from one score matrix).
CASES = [
    *[(arch, pruner, "unstructured", 0.5) for arch in CORE_ARCHITECTURES for pruner in PRUNERS],
    *[(arch, "sparsegpt", "2:4", None) for arch in CORE_ARCHITECTURES],
]
GENERATION_KWARGS = ("past_key_value", "past_key_values", "layer_past", "use_cache", "output_attentions")


class _Stop(Exception):
    pass


def capture_first_block(model: nn.Module, block: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, tuple, dict]:
    """Block-0 inputs for ``tokens`` (b, T): ``(hidden (b, T, H), extra positional args, kwargs)``."""
    seen: dict = {}

    def hook(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        seen["args"] = tuple(args[1:])
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k not in GENERATION_KWARGS and k != "hidden_states"}
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=tokens, attention_mask=torch.ones_like(tokens), use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["hidden"], seen["args"], seen["kwargs"]


def out_in(module: nn.Module) -> torch.Tensor:
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


@torch.no_grad()
def reference_prune(model_dir: Path, tokens: torch.Tensor, arch: str, pruner_name: str, pattern,
                    micro_batch: int) -> dict[str, torch.Tensor]:
    """Prune the whole in-memory model block by block; return its state dict."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    blocks = model.get_submodule(BLOCK_LISTS[arch])
    pruner = get_pruner(pruner_name)
    batches = []  # [hidden (b, T, H), args, kwargs] per micro-batch
    for start in range(0, tokens.shape[0], micro_batch):
        batches.append(list(capture_first_block(model, blocks[0], tokens[start : start + micro_batch])))

    for block in blocks:
        linears = {name: m for name, m in block.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
        stats = {name: pruner.new_stats(out_in(m).shape[1], "cpu") for name, m in linears.items()}
        handles = []
        if pruner.needs_calibration:
            for name, module in linears.items():
                handles.append(module.register_forward_hook(
                    lambda mod, args, output, s=stats[name]: s.add_batch(args[0])
                ))
        try:
            for hidden, args, kwargs in batches:
                block(hidden, *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        for name, module in linears.items():
            new_weight, keep_mask = pruner.prune(out_in(module).float().clone(), stats[name], pattern)
            assert not new_weight[~keep_mask].any()
            out_in(module).copy_(new_weight)
        for batch in batches:
            output = block(batch[0], *batch[1], **batch[2])
            batch[0] = output[0] if isinstance(output, (tuple, list)) else output
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


@pytest.mark.parametrize("arch,pruner,pattern_name,sparsity", CASES,
                         ids=[f"{a}-{p}-{s or n}" for a, p, n, s in CASES])
def test_streamed_result_equals_in_memory_reference(finished_job, tiny_model_dir, small_calib_file,
                                                    arch, pruner, pattern_name, sparsity):
    job, _ = finished_job(arch, pruner, pattern_name, sparsity, "row")
    model_dir = tiny_model_dir(arch)

    saved = load_file(job.out / ".reconstruct" / "calibration-tokens.safetensors")["tokens"]  # (n, T)
    recomputed = sample_windows(
        tokenize_text(read_text(str(small_calib_file)), AutoTokenizer.from_pretrained(model_dir)),
        job.calib.n_samples, job.calib.seq_len, job.calib.seed,
    )
    assert saved.shape == (job.calib.n_samples, job.calib.seq_len)
    assert torch.equal(saved, recomputed)

    reference = reference_prune(model_dir, saved, arch, pruner, job.prune.pattern, job.micro_batch)

    weight_map = json.loads((job.out / "model.safetensors.index.json").read_text())["weight_map"]
    streamed: dict[str, torch.Tensor] = {}
    for file in sorted(set(weight_map.values())):
        streamed.update(load_file(job.out / file))
    block_prefix = BLOCK_LISTS[arch] + "."
    block_keys = [key for key in streamed if key.startswith(block_prefix)]
    assert len(block_keys) > 0
    for key in block_keys:
        ours, theirs = streamed[key], reference[key]
        assert ours.shape == theirs.shape, key
        assert torch.equal(ours == 0, theirs == 0), f"{key}: masks differ in {int(((ours == 0) != (theirs == 0)).sum())} places"
        # the same pruner code on the same statistics from the same micro-batches: the same bits on any machine
        assert torch.equal(ours, theirs), f"{key}: differs by up to {float((ours - theirs).abs().max()):.3g}"
