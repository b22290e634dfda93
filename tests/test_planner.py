"""The memory planner against what the engine really allocates, on small CPU models.

How each planned number is checked (within 20%):

- block bytes: parameter and buffer bytes of block 0 after ``block_io.load_module_weights``;
- stream bytes: ``ActivationStream.nbytes()``;
- statistics bytes: the tensors of the pruner's own ``new_stats()`` for every linear of the block;
- pruner temporaries: the CPU allocator's peak (``torch.profiler``, below) while ``prune_layer`` runs;
- reconstruction working set: the real block is loaded and pruned, the method attached with
  ``attach_method`` and one AdamW step taken, then ``torch.profiler`` (``profile_memory=True``)
  records every allocation and free of the CPU allocator during one training micro-batch (forward,
  float32 MSE, backward into the parameter gradients). Replaying those events in time order gives
  the peak bytes held above the start. Adding the keep masks, the trainable parameters and the
  AdamW state read from ``optimizer.state`` gives the measured working set. The planner never runs
  that code on data: it traces the same forward/backward on the meta device, so the profiler is
  an independent measurement of the same quantity.

Plus the OPT-30B plan from its bare config (24 GB GPU) and ``run``'s refusal of an impossible budget.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig
from typer.testing import CliRunner

from conftest import WIKITEXT_VALID, build_word_tokenizer, make_job

from calib.activations import ActivationStream
from cli import app
from pruners import get_pruner
from pruners.pattern import SparsityPattern
from reconstruct.modelio.architecture import weight_as_out_in
from reconstruct.modelio.block_io import load_module_weights
from reconstruct.jobs.run_job import capture_kwargs_and_inputs
from reconstruct.loop.pruning import prune_layer
from reconstruct.modelio.loaded import load_model
from reconstruct.methods import ReconSpec, attach_method
from reconstruct.planner import GIB, MemoryBudget, parse_bytes, plan_from_config, plan_job, prune_temporary_bytes

OPT_30B = Path(__file__).parent / "fixtures" / "opt-30b-config.json"
TOLERANCE = 0.20  # planned vs measured bytes: a model of the allocator's peaks, not float rounding
SMALL_VOCAB = 512
SMALL_CONFIGS = {  # wide enough that activations, not bookkeeping, dominate the working set
    "llama": lambda: LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=SMALL_VOCAB, max_position_embeddings=256),
    "opt": lambda: OPTConfig(hidden_size=256, ffn_dim=512, num_hidden_layers=2, num_attention_heads=4,
                             vocab_size=SMALL_VOCAB, word_embed_proj_dim=256, max_position_embeddings=256,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "gpt2": lambda: GPT2Config(n_embd=256, n_layer=2, n_head=4, vocab_size=SMALL_VOCAB, n_positions=256,
                               bos_token_id=1, eos_token_id=2),
}
N_SAMPLES, SEQ_LEN = 8, 128


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    cache: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in cache:
            folder = tmp_path_factory.mktemp(f"small-{arch}")
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(SMALL_CONFIGS[arch]()).save_pretrained(folder)
            build_word_tokenizer(WIKITEXT_VALID, SMALL_VOCAB).save_pretrained(folder)
            cache[arch] = folder
        return cache[arch]

    return make


def close(planned: float, measured: float) -> bool:
    return abs(planned - measured) <= TOLERANCE * measured


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def small_job(folder: Path, pruner: str = "wanda", method: str | None = None):
    recon = ReconSpec(method=method, steps=2, batch_size=4, micro_batch=2) if method else None
    return make_job(folder, folder / "unused-out", pruner, sparsity=0.5, n_samples=N_SAMPLES, seq_len=SEQ_LEN,
                    recon=recon)


def loaded_block(loaded, index: int = 0):
    block = loaded.blocks[index]
    load_module_weights(block, loaded.layout.block_prefix(index), loaded.reader, loaded.key_map, loaded.device,
                        loaded.dtype)
    return block


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_block_stream_and_statistics_bytes(arch, small_model):
    """One block, one stream and the pruner statistics, as the planner counts them, against the real tensors."""
    folder = small_model(arch)
    loaded = load_model(str(folder), "cpu", "float32")
    block = loaded_block(loaded)
    measured_block = tensor_bytes(list(block.parameters()) + list(block.buffers()))
    stream = ActivationStream(N_SAMPLES, SEQ_LEN, loaded.hidden_size, loaded.dtype, loaded.device, "cpu")
    for pruner in ("wanda", "sparsegpt"):
        plan = plan_job(small_job(folder, pruner), loaded)
        pruner_obj = get_pruner(pruner)
        stats = [pruner_obj.new_stats(weight_as_out_in(block.get_submodule(name)).shape[1], "cpu")
                 for name in loaded.layout.linear_names]
        measured_stats = sum(tensor_bytes(s.state().values()) for s in stats)
        assert close(plan.sizes["block"], measured_block), (plan.sizes["block"], measured_block)
        assert close(plan.sizes["stream"], stream.nbytes()), (plan.sizes["stream"], stream.nbytes())
        assert close(plan.sizes["statistics"], measured_stats), (pruner, plan.sizes["statistics"], measured_stats)


def profiled_peak(fn) -> int:
    """Peak bytes the CPU allocator held above the start while ``fn`` ran (torch.profiler memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


@pytest.mark.parametrize("arch, method", [("llama", "masklora"), ("opt", "masklora"), ("gpt2", "bias-ln")])
def test_reconstruction_working_set_matches_the_profiler(arch, method, small_model):
    """Planned: keep masks + params + AdamW moments + traced fwd/bwd. Measured: the same on the real block."""
    folder = small_model(arch)
    loaded = load_model(str(folder), "cpu", "float32")
    job = small_job(folder, "magnitude", method)
    plan = plan_job(job, loaded)
    micro = plan.recon_micro_batch
    assert micro == 2

    tokens = torch.randint(0, SMALL_VOCAB, (N_SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    sparse = ActivationStream(N_SAMPLES, SEQ_LEN, loaded.hidden_size, loaded.dtype, loaded.device, "cpu")
    kwargs = capture_kwargs_and_inputs(loaded, tokens, job.micro_batch, sparse)
    block = loaded_block(loaded)
    linears = {name: block.get_submodule(name) for name in loaded.layout.linear_names}
    pruner = get_pruner("magnitude")
    keep_masks = {name: prune_layer(module, pruner, None, job.prune.pattern) for name, module in linears.items()}
    bias_linears = {name for name, module in linears.items() if module.bias is not None}
    handle = attach_method(method, block, linears, keep_masks, rank=16, alpha=32.0, bias_linears=bias_linears, seed=0)
    params = handle.trainable_parameters()
    inputs, targets = sparse.read(slice(0, micro)), sparse.read(slice(micro, 2 * micro))

    def micro_step():  # as reconstruct.methods.train does it
        out = kwargs.run(block, 0, inputs).float()
        target = targets.float()
        loss = torch.sum((out - target) ** 2) / (target[0].numel() * micro)
        loss.backward()

    optimizer = torch.optim.AdamW(params, lr=1e-4)
    micro_step()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step_peak = profiled_peak(micro_step)
    adam_state = tensor_bytes(t for state in optimizer.state.values() for t in state.values() if t.dim() > 0)
    measured = tensor_bytes(keep_masks.values()) + tensor_bytes(params) + adam_state + step_peak
    planned = plan.sizes["masks"] + 3 * plan.sizes["trainable"] + plan.sizes["recon_step"]

    assert plan.sizes["trainable"] == tensor_bytes(params)
    assert close(plan.sizes["recon_step"], step_peak), (plan.sizes["recon_step"], step_peak)
    assert close(planned, measured), (planned, measured)
    assert plan.sizes["recon_working_set"] >= planned  # it adds the AdamW step temporaries and the eval pass


@pytest.mark.parametrize("pruner, pattern", [
    ("wanda", ("unstructured", 0.5, "row")), ("wanda", ("unstructured", 0.5, "layer")), ("wanda", ("2:4", None, "row")),
    ("magnitude", ("unstructured", 0.5, "row")), ("sparsegpt", ("unstructured", 0.5, "row")),
])
def test_pruner_temporaries_match_the_profiler(pruner, pattern):
    """``loop.pruning.prune_layer`` on one (out, in) linear: the planner's formula against the allocator's peak."""
    out_features, in_features = 384, 512
    linear = torch.nn.Linear(in_features, out_features, bias=False).requires_grad_(False)
    pruner_obj = get_pruner(pruner)
    stats = pruner_obj.new_stats(in_features, "cpu")
    if stats is not None:
        stats.add_batch(torch.randn(256, in_features, generator=torch.Generator().manual_seed(0)))
    spec = SparsityPattern.parse(*pattern)
    measured = profiled_peak(lambda: prune_layer(linear, pruner_obj, stats, spec))
    planned = prune_temporary_bytes(pruner, out_features, in_features, torch.float32, spec)
    assert close(planned, measured), (planned, measured)


def opt30b_job(offload: str = "auto"):
    from reconstruct.config import CalibSpec, JobConfig, PruneSpec

    return JobConfig(
        model="facebook/opt-30b", out=Path("unused"),
        prune=PruneSpec(pruner="wanda", pattern=SparsityPattern.parse("unstructured", 0.5, "row")),
        calib=CalibSpec(source=str(WIKITEXT_VALID), n_samples=128, seq_len=2048),
        recon=ReconSpec(method="masklora"), device="cuda", dtype="float16", offload=offload,
    )


def test_opt30b_plan_fits_a_24gb_gpu():
    """OPT-30B, 128 x 2048 tokens, wanda + masklora in fp16: the plan's GPU peak is under 24 GB."""
    budget = MemoryBudget(device_bytes=24 * 10**9, host_bytes=64 * GIB)
    plan = plan_from_config(opt30b_job(), OPT_30B, budget)
    assert plan.fits, plan.format()
    assert plan.device_peak < 24 * 10**9
    assert plan.sizes["stream"] == 128 * 2048 * 7168 * 2
    assert plan.sizes["block"] > 12 * 7168 * 7168 * 2  # four 7168^2 attention linears + two 7168 x 28672 MLP linears
    # with the streams forced onto the GPU too, and on a smaller card, auto moves them to host memory
    small = plan_from_config(opt30b_job(), OPT_30B, MemoryBudget(device_bytes=12 * GIB, host_bytes=64 * GIB))
    assert small.stream_tier == "cpu" and small.fits, small.format()
    on_device = plan_from_config(opt30b_job("device"), OPT_30B, MemoryBudget(device_bytes=12 * GIB, host_bytes=64 * GIB))
    assert not on_device.fits and "--offload cpu" in on_device.refusal()


def test_plan_command_from_a_bare_config():
    result = CliRunner().invoke(app, [
        "plan", "--config", str(OPT_30B), "--device", "cuda", "--gpu-memory", "24GiB", "--host-memory", "64GiB",
        "--calib", str(WIKITEXT_VALID), "--method", "masklora", "--dtype", "float16",
    ])
    assert result.exit_code == 0, result.output
    assert "OPTForCausalLM, 48 x OPTDecoderLayer" in result.output
    assert "peak GPU" in result.output and "fits in 24.00 GiB" in result.output


def test_plan_without_device_but_with_gpu_memory_plans_for_a_gpu_and_exits_3_when_it_does_not_fit():
    """--gpu-memory asks for a GPU plan: --device auto plans for cuda and says why; "DOES NOT FIT" exits 3."""
    result = CliRunner().invoke(app, ["plan", "--config", str(OPT_30B), "--gpu-memory", "24GiB",
                                      "--host-memory", "8GiB"])
    assert result.exit_code == 3, result.output
    assert "device: cuda (--device auto" in result.stdout
    assert "peak GPU" in result.stdout and "DOES NOT FIT" in result.stdout


def test_plan_on_cpu_names_the_device_and_ignored_gpu_memory():
    result = CliRunner().invoke(app, ["plan", "--config", str(OPT_30B), "--device", "cpu", "--gpu-memory", "24GiB",
                                      "--calib", str(WIKITEXT_VALID), "--host-memory", "1TiB"])
    assert result.exit_code == 0, result.output
    assert "device: cpu (--device cpu; --gpu-memory is ignored" in result.stdout


def test_run_refuses_an_impossible_budget(tiny_model_dir, small_calib_file, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "run", "--model", str(tiny_model_dir("llama")), "--calib", str(small_calib_file), "--n-samples", "4",
        "--seq-len", "16", "--device", "cpu", "--host-memory", "1MiB", "--out", str(out),
    ])
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "does not fit" in error[0] and "--n-samples" in error[0], result.output
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("text, expected", [("24GiB", 24 * GIB), ("24GB", 24 * 10**9), ("512 MiB", 512 << 20),
                                            ("1e9", 10**9), ("1.5gib", int(1.5 * GIB))])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1GiB", "0", "12XB"])
def test_parse_bytes_refuses_garbage(text):
    with pytest.raises(ValueError, match="--gpu-memory"):
        parse_bytes(text)
