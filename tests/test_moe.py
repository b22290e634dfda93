"""Mixture-of-experts models (stacked experts): every expert pruned and repaired as linears of its own.

Tiny random Mixtral and Qwen3-MoE models (conftest: 2 blocks, 4 experts, 2 per token) saved by
transformers itself, so the checkpoint stores one tensor per expert and projection in transformers'
key layout (Mixtral's ``block_sparse_moe.experts.0.w1.weight``, Qwen3-MoE's ``mlp.experts.0.gate_proj.weight``).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import MOE_ARCHITECTURES, TINY_CONFIGS, VOCAB_SIZE, WIKITEXT_VALID, build_word_tokenizer, make_job
from pruners import get_pruner
from pruners.pattern import SparsityPattern
from reconstruct.jobs.run_job import run_job
from reconstruct.methods import ReconSpec
from reconstruct.modelio.experts import ExpertList, expert_linear_names, unstack_experts
from reconstruct.modelio.loaded import load_model
from reconstruct.planner import GIB, MemoryBudget, plan_from_config
from test_resume import Job, assert_same_output, crashed, ok
from tolerances import assert_within, forward_bound

SCHEDULE_EARLY = True  # conftest: whole jobs, so this module starts early
N_EXPERTS = 4
STARVED = 3  # the expert test_an_expert_without_tokens... keeps from every token of block 0


def output_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a written folder."""
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def expert_weights(folder) -> dict[str, torch.Tensor]:
    """The written per-expert weights, by checkpoint name (``...experts.<e>.<projection>.weight``)."""
    return {name: tensor for name, tensor in output_tensors(folder).items() if ".experts." in name}


def load_stock(folder):
    """The folder in stock transformers, refused on any missing or unexpected key."""
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model


def stacked_expert_count(model) -> int:
    """Stacked experts modules in a stock model."""
    return sum(1 for module in model.modules() if hasattr(module, "gate_up_proj"))


# --------------------------------------------------------------------------- the experts module
@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_unstacked_experts_compute_transformers_eager_forward(arch):
    """One linear per expert and projection, the hit-expert loop and index_add_ of the eager form.

    The gate and up projections are two matmuls instead of one of the concatenated weight: each output
    element is the same dot product, summed perhaps in another order, so logits agree within the
    forward's rounding bound (tolerances.forward_bound, float32).
    """
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(TINY_CONFIGS[arch]()).eval()
    stock.set_experts_implementation("eager")
    ours = copy.deepcopy(stock)
    assert unstack_experts(ours) == TINY_CONFIGS[arch]().num_hidden_layers
    assert not any(hasattr(module, "gate_up_proj") for module in ours.modules())
    assert all(isinstance(layer.mlp.experts, ExpertList) for layer in ours.model.layers)
    tokens = torch.randint(3, VOCAB_SIZE, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = stock(input_ids=tokens).logits
        assert_within(ours(input_ids=tokens).logits, expected, forward_bound(expected, TINY_CONFIGS[arch]()))


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_the_engine_sees_each_experts_linears_under_the_checkpoints_names(tiny_model_dir, arch):
    loaded = load_model(str(tiny_model_dir(arch)), "cpu", "float32")
    names = {"mixtral": ("w1", "w3", "w2"), "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}[arch]
    expected = {f"mlp.experts.{e}.{name}" for e in range(N_EXPERTS) for name in names}
    assert expected <= set(loaded.layout.linear_names)
    assert expert_linear_names(loaded.blocks[0]) == expected
    assert "mlp.gate" not in loaded.layout.linear_names  # the router is not pruned
    assert set(loaded.key_map[f"model.layers.0.{name}.weight"] for name in expected) <= set(loaded.reader.keys())


# --------------------------------------------------------------------------- prune: exact per expert
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_wanda_prunes_every_expert_weight_exactly_and_stock_transformers_loads_it(tiny_model_dir, small_calib_file,
                                                                                 tmp_path, arch, pattern):
    out = tmp_path / "out"
    report = run_job(make_job(tiny_model_dir(arch), out, "wanda", pattern=pattern,
                              sparsity=0.5 if pattern == "unstructured" else None, calib=small_calib_file,
                              n_samples=4, recon=ReconSpec(method="none")))
    weights = expert_weights(out)
    n_layers = TINY_CONFIGS[arch]().num_hidden_layers
    assert len(weights) == n_layers * N_EXPERTS * 3
    for name, weight in weights.items():  # (out, in)
        if pattern == "unstructured":  # per row: exactly half of each row is zero
            zeros = (weight == 0).sum(dim=1)
            assert torch.equal(zeros, torch.full_like(zeros, weight.shape[1] // 2)), name
        else:  # 2:4: exactly two zeros in every group of four inputs
            zeros = (weight.reshape(weight.shape[0], -1, 4) == 0).sum(dim=-1)
            assert torch.equal(zeros, torch.full_like(zeros, 2)), name
    assert all(block["experts"]["experts"] == N_EXPERTS for block in report["blocks"])

    stock = load_stock(out)  # stacked again by transformers: the zeros are in its (E, 2I, H) / (E, H, I) tensors
    assert stacked_expert_count(stock) == n_layers
    experts = stock.model.layers[0].mlp.experts
    gate, up, down = {"mixtral": ("w1", "w3", "w2"), "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}[arch]
    prefix = "model.layers.0." + ("block_sparse_moe" if f"model.layers.0.block_sparse_moe.experts.0.{gate}.weight"
                                  in weights else "mlp") + ".experts"
    for e in range(N_EXPERTS):  # no arithmetic: the written tensors copied into the stacked ones
        written = torch.cat([weights[f"{prefix}.{e}.{gate}.weight"], weights[f"{prefix}.{e}.{up}.weight"]])
        assert torch.equal(experts.gate_up_proj[e].detach(), written)
        assert torch.equal(experts.down_proj[e].detach(), weights[f"{prefix}.{e}.{down}.weight"])


# --------------------------------------------------------------------------- few or no tokens
def save_starved_model(arch: str, folder):
    """The tiny ``arch`` model whose block-0 router never sends a token to expert ``STARVED``.

    Every embedding gets feature 0 = 1: after the RMSNorm feature 0 dominates every token's input to the
    router (about sqrt(hidden) against the others' ~0.02 sqrt(hidden)), and the router's rows give it logit
    -5 x that for the starved expert and +5 x that for the others: it never reaches the top 2 of 4.
    """
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[arch]())
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        router = model.model.layers[0].mlp.gate.weight  # (E, H)
        router[STARVED] = 0.0
        router[:, 0] = 5.0
        router[STARVED, 0] = -5.0
    model.save_pretrained(folder)
    build_word_tokenizer(WIKITEXT_VALID, VOCAB_SIZE).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_an_expert_without_tokens_is_pruned_by_magnitude_and_reported(small_calib_file, tmp_path, arch):
    model = save_starved_model(arch, tmp_path / "model")
    out = tmp_path / "out"
    report = run_job(make_job(model, out, "wanda", sparsity=0.5, calib=small_calib_file, n_samples=4,
                              recon=ReconSpec(method="none")))
    few = report["blocks"][0]["experts"]["few_tokens"]
    assert few.get(f"mlp.experts.{STARVED}") == 0, report["blocks"][0]["experts"]
    summary = report["experts"]
    assert summary["experts"] == 2 * N_EXPERTS and summary["few_tokens"] >= 1 and summary["min_tokens"] == 32
    text = (out / "report.md").read_text()
    assert f"{summary['few_tokens']} of {2 * N_EXPERTS} experts had fewer than 32 calibration tokens" in text

    source = load_model(str(model), "cpu", "float32")
    written = expert_weights(out)
    magnitude = get_pruner("magnitude")
    for name in expert_linear_names(source.blocks[0]):
        if not name.startswith(f"mlp.experts.{STARVED}."):
            continue
        key = source.key_map[f"model.layers.0.{name}.weight"]
        dense = source.reader.read(key).float()  # (out, in)
        expected, _ = magnitude.prune(dense.clone(), None, SparsityPattern.parse("unstructured", 0.5, "row"))
        stored = written[f"model.layers.0.{name}.weight"] if f"model.layers.0.{name}.weight" in written else written[key]
        assert torch.equal(stored == 0, expected == 0), name  # no arithmetic: the same mask of the same weights
    load_stock(out)


# --------------------------------------------------------------------------- repairs keep every zero
@pytest.mark.parametrize("method", ["bias-ln", "masklora"])
@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_repairs_keep_every_zero_of_every_expert(tiny_model_dir, small_calib_file, tmp_path, arch, method):
    out = tmp_path / "out"
    recon = ReconSpec(method=method, steps=4, rank=4, alpha=8.0)
    report = run_job(make_job(tiny_model_dir(arch), out, "wanda", sparsity=0.5, calib=small_calib_file, n_samples=4,
                              recon=recon))
    assert all(block["recon_steps"] > 0 for block in report["blocks"])
    for name, weight in expert_weights(out).items():  # each row's masks had exactly half its weights
        zeros = (weight == 0).sum(dim=1)
        assert torch.equal(zeros, torch.full_like(zeros, weight.shape[1] // 2)), name
    load_stock(out)


# --------------------------------------------------------------------------- resume
def test_crash_then_resume_gives_identical_output(tiny_model_dir, small_calib_file, tmp_path):
    """Killed while block 1's shard was being written: the resumed folder equals an uninterrupted run's bytes."""
    job = Job(tiny_model_dir("qwen3_moe"), small_calib_file, figures=False)
    flags = dict(n_samples="4", pruner="sparsegpt", method="masklora", recon_steps="2")
    reference = tmp_path / "reference"
    ok(job.run(reference, fresh=True, **flags))
    out = tmp_path / "out"
    crashed(job.run(out, crash="writer:1", **flags))
    ok(job.run(out, **flags))
    assert_same_output(out, reference)


# --------------------------------------------------------------------------- plan
QWEN3_30B_A3B = {  # the published config values of Qwen/Qwen3-30B-A3B (no weights needed)
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 48,
    "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936, "intermediate_size": 6144,
    "max_position_embeddings": 40960, "torch_dtype": "bfloat16", "tie_word_embeddings": False, "norm_topk_prob": True,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
}


def test_qwen3_30b_a3b_plan_counts_the_experts_bytes_and_statistics(tmp_path):
    """SparseGPT on Qwen3-30B-A3B's config (no weights) for a 24 GB GPU: the block's 384 expert linears and their
    Hessians dominate. ``--method none`` keeps the trace short (a traced MaskLoRA backward over 388 adapters on
    meta takes half a minute here; the README gives that plan's numbers)."""
    from reconstruct.config import CalibSpec, JobConfig, PruneSpec

    config = tmp_path / "config.json"
    config.write_text(json.dumps(QWEN3_30B_A3B))
    job = JobConfig(model="Qwen/Qwen3-30B-A3B", out=tmp_path / "unused",
                    prune=PruneSpec(pruner="sparsegpt", pattern=SparsityPattern.parse("unstructured", 0.5, "row")),
                    calib=CalibSpec(source=str(WIKITEXT_VALID), n_samples=128, seq_len=2048),
                    recon=ReconSpec(method="none"), device="cuda", dtype="bfloat16")
    plan = plan_from_config(job, config, MemoryBudget(device_bytes=24 * 10**9, host_bytes=64 * GIB))
    assert plan.fits, plan.format()
    assert plan.device_peak < 24 * 10**9
    experts_bytes = 128 * 3 * 768 * 2048 * 2  # 128 experts x (gate, up, down) of 768 x 2048, bfloat16
    attention_bytes = (2 * 32 * 128 + 2 * 4 * 128) * 2048 * 2  # q, o and k, v
    assert plan.sizes["block"] >= experts_bytes + attention_bytes
    assert plan.sizes["stream"] == 128 * 2048 * 2048 * 2
    # every expert linear's Hessian (in x in, float32): gate and up 2048^2, down 768^2
    assert plan.sizes["statistics"] >= 128 * (2 * 2048**2 + 768**2) * 4, plan.format()
