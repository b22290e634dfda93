"""Model-level retraining (``reconstruct.retrain``): zeros kept, streamed = resident, gradients, hooks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import BLOCK_LISTS, CORE_ARCHITECTURES, save_tiny_model
from reconstruct.modelio.loaded import load_model
from reconstruct.modelio.output import shard_name
from reconstruct.retrain import NoHooks, RetrainSpec, retrain_model
from reconstruct.retrain.schedule import lr_factor
from reconstruct.retrain.session import BlockLoader
from reconstruct.retrain.streamed import StreamedModel
from reconstruct.retrain.trainables import ModelTrainables
from tolerances import assert_within, gamma

SPARSITY = 0.5
SEQ_LEN = 16
SPARSITY_PRESERVING = ("bias", "ln", "bias-ln", "masklora", "scalelora")


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def prune_folder(folder: Path, arch: str) -> None:
    """Zero the smaller half of every 2-D block tensor's entries (the linears), in place."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    for key, value in tensors.items():
        if key.startswith(BLOCK_LISTS[arch] + ".") and value.dim() == 2:
            value[value.abs() < value.abs().flatten().kthvalue(int(value.numel() * SPARSITY)).values] = 0
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="session")
def pruned_dir(tmp_path_factory):
    """``pruned_dir(arch)`` → a tiny model folder whose block linears are 50% zero."""
    cache: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in cache:
            folder = save_tiny_model(arch, tmp_path_factory.mktemp(f"pruned-{arch}"))
            prune_folder(folder, arch)
            cache[arch] = folder
        return cache[arch]

    return make


def windows(n: int = 8, seed: int = 0) -> torch.Tensor:
    """(n, T) random token ids of the tiny vocabulary (the specials left out)."""
    return torch.randint(3, 500, (n, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def small_spec(method: str, **changes) -> RetrainSpec:
    fields = dict(method=method, steps=3, batch=4, micro_batch=2, seq_len=SEQ_LEN, n_windows=8, lr=1e-2,
                  val_fraction=0.0, warmup=0.0)
    fields.update(changes)
    return RetrainSpec(**fields)


def block_tensors(out: Path, n_blocks: int) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for index in range(n_blocks):
        tensors.update(load_file(out / shard_name(index, n_blocks + 1)))
    return tensors


# --------------------------------------------------------------------------- zeros
@pytest.mark.parametrize("arch", CORE_ARCHITECTURES)
def test_every_zero_of_the_input_stays_zero_bit_for_bit(arch, pruned_dir, tmp_path):
    folder = pruned_dir(arch)
    source = load_file(folder / "model.safetensors")
    for method in SPARSITY_PRESERVING:
        loaded = load_model(str(folder), "cpu", "float32")
        out = tmp_path / method
        retrain_model(loaded, small_spec(method), "", out, stream=True, tokens=windows())
        written = block_tensors(out, loaded.layout.n_blocks)
        changed = False
        for key, value in written.items():
            if key in source and source[key].dim() == 2:
                zeros = source[key] == 0
                assert zeros.any()
                assert torch.equal(value[zeros].view(torch.int32), torch.zeros_like(value[zeros]).view(torch.int32)), key
            changed |= key not in source or not torch.equal(value, source[key])
        assert changed, f"{method}: training changed nothing"


# --------------------------------------------------------------------------- streamed = resident
@pytest.mark.parametrize("arch", CORE_ARCHITECTURES)
@pytest.mark.parametrize("method", ["bias-ln", "masklora"])
def test_streamed_and_resident_paths_write_the_same_bytes(arch, method, pruned_dir, tmp_path):
    """Both run the same float operations in the same order (same micro-batches, same loss scaling): equal."""
    results, outputs = {}, {}
    for stream in (True, False):
        loaded = load_model(str(pruned_dir(arch)), "cpu", "float32")
        out = tmp_path / f"stream-{stream}"
        results[stream] = retrain_model(loaded, small_spec(method, val_fraction=0.25), "", out, stream=stream,
                                        tokens=windows())
        outputs[stream] = block_tensors(out, loaded.layout.n_blocks)
    assert results[True].loss_curve == results[False].loss_curve
    assert results[True].val_curve == results[False].val_curve
    assert outputs[True].keys() == outputs[False].keys()
    for key in outputs[True]:
        assert torch.equal(outputs[True][key], outputs[False][key]), key


# --------------------------------------------------------------------------- gradients
def reference_gradients(folder: Path, spec: RetrainSpec, state: dict, tokens: torch.Tensor) -> list[list[torch.Tensor]]:
    """Gradients of the mean token loss from an ordinary float64 model, torch's cross-entropy in float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).double().eval()
    for param in model.parameters():
        param.requires_grad_(False)
    loaded = load_model(str(folder), "cpu", "float32")
    trainables = ModelTrainables(spec, loaded.layout)
    blocks = model.get_submodule(loaded.layout.blocks_path)
    for index, block in enumerate(blocks):
        trainables.attach(index, block)
    trainables.load_state(state)
    logits = model(input_ids=tokens, use_cache=False).logits  # (n, T, V) float64
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    return [[param.grad for param in trainables.by_block[index]] for index in range(len(blocks))]


@pytest.mark.parametrize("arch", CORE_ARCHITECTURES)
@pytest.mark.parametrize("method", ["bias-ln", "masklora", "scalelora"])
def test_streamed_gradients_equal_a_full_model_backward(arch, method, pruned_dir):
    """In float64, against transformers' own loss and autograd over the whole model.

    Bound: every gradient entry is built from sums of at most K products along the path (K: the block
    widths, the sequence and the vocabulary, summed over the depth); each such sum errs by at most
    gamma_K times the sum of absolute terms, which the largest entry of the tensor bounds to first order.
    The trainables are float32: each micro-batch's gradient is rounded to float32 and accumulated there
    (two micro-batches here, one in the reference), and the adapters' product and its gradients are
    float32 sums over at most the widest weight dimension W; that adds gamma_(W+3) (float32) of it.
    """
    folder = pruned_dir(arch)
    spec = small_spec(method)
    tokens = windows(4, seed=1)
    loaded = load_model(str(folder), "cpu", "float32")
    loaded.dtype = torch.float64
    trainables = ModelTrainables(spec, loaded.layout)
    model = StreamedModel(BlockLoader(loaded, trainables, NoHooks()), micro_batch=3, tier="cpu", scratch=Path("."))
    model.loss(tokens[:1])  # attaches every block once: the trainables exist
    generator = torch.Generator().manual_seed(5)
    state = {key: value + 0.1 * torch.randn(value.shape, generator=generator, dtype=value.dtype)
             for key, value in trainables.state().items()}  # away from the init (B = 0 hides A's gradient)
    trainables.load_state(state)
    model.loss_and_gradients(tokens)
    model.close()
    expected = reference_gradients(folder, spec, state, tokens)
    config = loaded.config
    widest = max(max(param.shape) for param in loaded.blocks.parameters())
    terms = config.num_hidden_layers * (4 * config.hidden_size + 4 * 128 + SEQ_LEN) + config.vocab_size
    for index, params in trainables.by_block.items():
        for param, reference in zip(params, expected[index]):
            assert param.grad is not None and reference is not None
            scale = reference.abs().max().double()
            assert scale > 0
            bound = gamma(terms, torch.float64) * scale + gamma(widest + 3, torch.float32) * scale
            assert_within(param.grad, reference, bound)


# --------------------------------------------------------------------------- hooks, no merge, the guard
class CountingHooks(NoHooks):
    def __init__(self):
        self.loaded: list[int] = []
        self.ready: list[int] = []
        self.steps: list[int] = []

    def block_loaded(self, index, block):
        self.loaded.append(index)

    def block_gradients_ready(self, index, block):
        assert all(param.grad is not None for param in block.parameters() if param.requires_grad)
        self.ready.append(index)

    def step_done(self, step):
        self.steps.append(step)


@pytest.mark.parametrize("stream", [True, False])
def test_hooks_are_called_on_every_load_and_after_each_backward(stream, pruned_dir, tmp_path):
    loaded = load_model(str(pruned_dir("llama")), "cpu", "float32")
    hooks = CountingHooks()
    spec = small_spec("masklora", steps=2)
    retrain_model(loaded, spec, "", tmp_path / "out", stream=stream, tokens=windows(), hooks=hooks)
    n = loaded.layout.n_blocks
    forward, backward, write = list(range(n)), list(reversed(range(n))), list(range(n))
    expected_loads = (forward + backward) * 2 + write if stream else forward + write
    assert hooks.loaded == expected_loads
    assert hooks.ready == backward * 2
    assert hooks.steps == [1, 2]


def test_free_heap_pages_are_returned_after_every_block_release(pruned_dir, tmp_path, monkeypatch):
    """Streamed: after each block session and each written block, glibc's free heap pages go back to the OS."""
    from reconstruct.retrain import output, session

    trims = []
    for module in (session, output):
        monkeypatch.setattr(module, "release_free_heap", lambda *slack: trims.append(1))
    loaded = load_model(str(pruned_dir("llama")), "cpu", "float32")
    hooks = CountingHooks()
    retrain_model(loaded, small_spec("masklora", steps=2), "", tmp_path / "out", stream=True, tokens=windows(),
                  hooks=hooks)
    n = loaded.layout.n_blocks
    assert len(trims) == 2 * 2 * n + n  # block sessions (forward and backward, 2 steps), then one per written block


def test_no_merge_writes_the_blocks_as_loaded_with_the_hooks_changes(pruned_dir, tmp_path):
    class ZeroFirstRow(NoHooks):
        def block_loaded(self, index, block):
            with torch.no_grad():
                block.get_submodule("mlp.down_proj").base.weight[0].zero_()

    folder = pruned_dir("llama")
    loaded = load_model(str(folder), "cpu", "float32")
    retrain_model(loaded, small_spec("masklora"), "", tmp_path / "out", tokens=windows(), hooks=ZeroFirstRow(),
                  merge=False, stream=True)
    source = load_file(folder / "model.safetensors")
    written = block_tensors(tmp_path / "out", loaded.layout.n_blocks)
    for key, value in written.items():
        expected = source[key].clone()
        if key.endswith("mlp.down_proj.weight"):
            expected[0] = 0
        assert torch.equal(value, expected), key


def test_a_retraining_that_does_not_generalise_writes_the_input_unchanged(pruned_dir, tmp_path, caplog):
    folder = pruned_dir("opt")
    loaded = load_model(str(folder), "cpu", "float32")
    spec = small_spec("bias-ln", lr=50.0, val_fraction=0.25, eval_every=1)  # diverges
    result = retrain_model(loaded, spec, "", tmp_path / "out", tokens=windows(), stream=True)
    assert not result.kept and result.best_step == 0
    assert all(val >= result.val_before for _, val in result.val_curve)
    source = load_file(folder / "model.safetensors")
    for key, value in block_tensors(tmp_path / "out", loaded.layout.n_blocks).items():
        assert torch.equal(value, source[key]), key
    assert "written unchanged" in caplog.text


# --------------------------------------------------------------------------- schedule and bad input
def test_schedule_warms_up_then_decays_linearly_to_zero():
    factors = [lr_factor(step, 10, 0.2) for step in range(10)]
    assert factors[:3] == [0.0, 0.5, 1.0]
    assert factors[2:] == pytest.approx([(10 - s) / 8 for s in range(2, 10)])
    assert lr_factor(0, 5, 0.0) == 1.0


@pytest.mark.parametrize(("changes", "flag"), [({"method": "lora"}, "--allow-dense-merge"),
                                               ({"method": "none"}, "--method"), ({"steps": 0}, "--steps"),
                                               ({"warmup": 1.0}, "--warmup"), ({"stream": "maybe"}, "--stream")])
def test_bad_settings_are_refused_naming_the_flag(changes, flag):
    with pytest.raises(ValueError, match=flag):
        RetrainSpec(**changes)


# --------------------------------------------------------------------------- memory
def test_memory_plan_refuses_naming_the_flag_and_streaming_needs_less(pruned_dir, monkeypatch):
    from reconstruct.retrain import memory

    loaded = load_model(str(pruned_dir("llama")), "cpu", "float32")
    spec = small_spec("masklora")
    resident, streamed = memory.estimate(spec, loaded, False), memory.estimate(spec, loaded, True)
    assert streamed.total < resident.total
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(streamed.total / memory.FIT_SHARE) + 1)
    assert memory.check_fits(spec, loaded, True).fits
    with pytest.raises(ValueError, match="--stream always"):
        memory.check_fits(spec, loaded, False)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1)
    with pytest.raises(ValueError, match="--batch-size"):
        memory.check_fits(spec, loaded, True)


def test_the_backward_holds_only_the_inputs_of_the_blocks_below(pruned_dir, monkeypatch):
    """While block k is loaded in the backward, the boundary states of blocks above it are released."""
    import gc
    import weakref

    from calib.activations import ActivationStream

    loaded = load_model(str(pruned_dir("llama")), "cpu", "float32")
    n = loaded.layout.n_blocks
    alive: weakref.WeakSet = weakref.WeakSet()
    make = StreamedModel._stream

    def tracked(self, name, tokens):
        stream = make(self, name, tokens)
        if name.startswith("boundary-"):
            alive.add(stream)
        return stream

    class Held(NoHooks):
        def __init__(self):
            self.backward = False
            self.held: list[tuple[int, int]] = []

        def block_loaded(self, index, block):
            if self.backward:
                gc.collect()
                self.held.append((index, sum(isinstance(s, ActivationStream) for s in alive)))

    monkeypatch.setattr(StreamedModel, "_stream", tracked)
    hooks = Held()
    model = StreamedModel(BlockLoader(loaded, ModelTrainables(small_spec("masklora"), loaded.layout), hooks),
                          micro_batch=2, tier="cpu", scratch=Path("."))
    forward = StreamedModel._forward

    def then_backward(self, tokens, keep_all):
        streams = forward(self, tokens, keep_all)
        hooks.backward = True
        return streams

    monkeypatch.setattr(StreamedModel, "_forward", then_backward)
    model.loss_and_gradients(windows(4))
    model.close()
    assert hooks.held == [(index, index + 1) for index in reversed(range(n))]  # the inputs of blocks 0 .. k


def test_boundary_states_on_disk_give_the_same_gradients(pruned_dir, tmp_path):
    """The disk tier (memory-mapped files) stores the same values as host memory: equal gradients."""
    grads = {}
    for tier in ("cpu", "disk"):
        loaded = load_model(str(pruned_dir("gpt2")), "cpu", "float32")
        trainables = ModelTrainables(small_spec("bias-ln"), loaded.layout)
        model = StreamedModel(BlockLoader(loaded, trainables, NoHooks()), micro_batch=2, tier=tier, scratch=tmp_path)
        model.loss_and_gradients(windows(4))
        assert bool(list(tmp_path.glob("retrain-boundary-*.bin"))) == (tier == "disk")
        model.close()
        assert not list(tmp_path.glob("retrain-*.bin"))  # close() removes the disk tier's files
        grads[tier] = [param.grad for param in trainables.parameters()]
    for cpu, disk in zip(grads["cpu"], grads["disk"]):
        assert torch.equal(cpu, disk)


def test_memory_plan_leaves_out_boundary_states_that_go_to_disk(pruned_dir, monkeypatch):
    """On the CPU, boundary states too large for host memory live on disk (``boundary_tier``): the
    streamed plan must not count them, or a job that runs is refused."""
    from reconstruct.retrain import memory

    loaded = load_model(str(pruned_dir("llama")), "cpu", "float32")
    spec = small_spec("masklora")
    monkeypatch.setattr(memory, "boundary_tier", lambda spec, loaded: "cpu")
    in_memory = memory.estimate(spec, loaded, True)
    monkeypatch.setattr(memory, "boundary_tier", lambda spec, loaded: "disk")
    on_disk = memory.estimate(spec, loaded, True)
    boundary = (loaded.layout.n_blocks + 2) * spec.batch * spec.seq_len * loaded.hidden_size * 4  # float32
    assert in_memory.total - on_disk.total == boundary
