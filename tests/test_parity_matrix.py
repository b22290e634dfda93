"""The parity matrix: every decoder-only family streams exactly as transformers runs it, or is refused.

One row per family of ``tests/families.py`` (mixed layer types, sliding windows shorter than the
windows, GQA, biases, tied embeddings):
1. the streamed forward equals the model's own forward, and ``eval --stream`` equals ``--no-stream``
   (float64, within :func:`tolerances.forward_bound`);
2. ``run --pruner wanda --sparsity 0.5 --method masklora`` with the (streamed) retraining stage finishes with
   exact sparsity, every zero kept through retraining, and the folder loads in stock transformers
   with no missing or unexpected keys;
3. ``--shrink`` works (the smaller model loads) or is refused with its reason;
4. families the engine cannot handle are refused up front with one line naming what is unsupported.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from conftest import WIKITEXT_VALID, build_word_tokenizer, make_job
from families import FAMILIES, REFUSED, SHRINK_REFUSED, STREAMED, VOCAB, WINDOW, save_family_model
from reconstruct.evaluation.perplexity import perplexity
from reconstruct.evaluation.streaming import InMemoryLM, StreamedLM
from reconstruct.jobs.run_job import run_job
from reconstruct.methods import ReconSpec
from reconstruct.modelio.loaded import load_model
from reconstruct.retrain import RetrainSpec
from reconstruct.shrink import SHRUNK_DIR, shrink_folder
from tolerances import assert_within, forward_bound

SCHEDULE_EARLY = True  # conftest: a whole job per family, so this module starts first
SEQ_LEN = 32  # longer than the sliding window, so sliding and full masks differ
assert SEQ_LEN > WINDOW
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    """``family_dir(name)`` → folder of the saved tiny ``name`` model (built once per module)."""
    tokenizer = build_word_tokenizer(WIKITEXT_VALID, VOCAB)
    cache = {}

    def make(name: str):
        if name not in cache:
            cache[name] = save_family_model(name, tmp_path_factory.mktemp(f"family-{name}"), tokenizer)
        return cache[name]

    return make


def random_windows(n: int, seed: int = 0) -> torch.Tensor:
    """(n, SEQ_LEN) token ids of the tiny vocabulary, the special ids left out."""
    return torch.randint(3, VOCAB, (n, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", STREAMED)
def test_streamed_forward_equals_the_models_own(family_dir, family):
    folder = family_dir(family)
    windows = [random_windows(3)]  # micro-batches of 2 and 1
    whole = torch.cat([logits for _, _, logits in InMemoryLM(folder, CPU, torch.float64).logits(windows, 2)])
    streamed = torch.cat([logits for _, _, logits in StreamedLM(folder, CPU, torch.float64).logits(windows, 2)])
    assert_within(streamed, whole, forward_bound(whole, FAMILIES[family](), torch.float64))


@pytest.mark.parametrize("family", STREAMED)
def test_eval_stream_equals_no_stream(family_dir, small_calib_file, family):
    folder = str(family_dir(family))
    args = dict(seq_len=SEQ_LEN, max_windows=3, device="cpu", dtype="float64", batch_size=2)
    whole = perplexity(folder, str(small_calib_file), stream=False, **args)
    streamed = perplexity(folder, str(small_calib_file), stream=True, **args)
    assert (whole["streamed"], streamed["streamed"]) == (False, True)
    # log-perplexity is a mean of log-probabilities: its error is bounded by the logits' bound (log-softmax is
    # 1-Lipschitz per logit in the max norm, twice over), relative to the perplexity itself
    bound = 2 * float(forward_bound(torch.ones(1), FAMILIES[family](), torch.float64).max())
    assert abs(torch.log(torch.tensor(streamed["perplexity"] / whole["perplexity"], dtype=torch.float64))) <= bound


def block_tensors(folder, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor of the written folder under ``prefix`` (its blocks)."""
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update({k: v for k, v in load_file(path).items() if k.startswith(prefix)})
    return tensors


def assert_loads_cleanly(folder) -> None:
    """Stock transformers loads ``folder`` with no missing and no unexpected keys."""
    _, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


@pytest.mark.parametrize("family", STREAMED)
def test_prune_repair_retrain_keeps_exact_sparsity_and_loads(family_dir, small_calib_file, tmp_path, family):
    recon = ReconSpec(method="masklora", steps=4, rank=4, alpha=8.0, val_fraction=0.25, eval_every=2)
    retrain = RetrainSpec(method="masklora", steps=2, batch=2, seq_len=SEQ_LEN, rank=4, alpha=8.0, n_windows=4,
                          val_fraction=0.0, eval_every=2, stream="always")  # streamed: each block its own arguments
    job = replace(make_job(family_dir(family), tmp_path / "out", "wanda", sparsity=0.5, calib=small_calib_file,
                           n_samples=4, seq_len=SEQ_LEN, micro_batch=2, recon=recon), retrain=retrain)
    report = run_job(job)
    assert report["retrain"]["steps"] == retrain.steps  # the retraining stage ran on the pruned folder

    loaded = load_model(str(tmp_path / "out"), "cpu", "float32")
    tensors = block_tensors(tmp_path / "out", loaded.layout.blocks_path + ".")
    n_linears = 0
    for index in range(loaded.layout.n_blocks):
        for name in loaded.layout.linear_names:
            weight = tensors[f"{loaded.layout.block_prefix(index)}{name}.weight"]
            stored_in_out = isinstance(loaded.blocks[index].get_submodule(name), Conv1D)  # GPT-2 stores (in, out)
            out_in = weight.T if stored_in_out else weight  # (out, in)
            zeros_per_row = (out_in == 0).sum(dim=1)
            assert torch.equal(zeros_per_row, torch.full_like(zeros_per_row, out_in.shape[1] // 2)), name
            n_linears += 1
    assert n_linears == loaded.layout.n_blocks * len(loaded.layout.linear_names)
    assert_loads_cleanly(tmp_path / "out")


@pytest.mark.parametrize("family", STREAMED)
def test_shrink_works_or_is_refused_with_its_reason(family_dir, small_calib_file, tmp_path, family):
    job = replace(make_job(family_dir(family), tmp_path / "out", "magnitude", pattern="channels", sparsity=0.5,
                           calib=small_calib_file, n_samples=2, seq_len=SEQ_LEN, micro_batch=2), shrink=True)
    shrunk = tmp_path / "out" / SHRUNK_DIR
    try:
        run_job(job)
        shrink_folder(tmp_path / "out", shrunk)  # what `run --shrink` does after the job
    except ValueError as refusal:
        assert family in SHRINK_REFUSED, refusal
        assert str(refusal).startswith("--shrink") and "\n" not in str(refusal), refusal
        return
    assert family not in SHRINK_REFUSED
    assert_loads_cleanly(shrunk)
    small = AutoModelForCausalLM.from_pretrained(shrunk, dtype=torch.float64).eval()
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    assert small.num_parameters() < pruned.num_parameters()
    tokens = random_windows(2)
    with torch.no_grad():  # the deleted channels were zero: the smaller model computes the same function
        expected = pruned(input_ids=tokens).logits
        assert_within(small(input_ids=tokens).logits, expected, forward_bound(expected, FAMILIES[family]()))


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_unsupported_families_are_refused_before_any_work(family_dir, small_calib_file, tmp_path, family):
    job = make_job(family_dir(family), tmp_path / "out", "wanda", sparsity=0.5, calib=small_calib_file,
                   n_samples=2, seq_len=SEQ_LEN, micro_batch=2)
    with pytest.raises(ValueError, match=REFUSED[family]) as refusal:
        run_job(job)
    assert "\n" not in str(refusal.value)
    assert not (tmp_path / "out").exists()


def test_the_door_check_stops_a_job_whose_blocks_get_wrong_arguments(family_dir, small_calib_file, tmp_path,
                                                                     monkeypatch):
    """Every block given block 0's arguments (the bug this matrix exists for): refused before block 1."""
    from calib.capture import BlockArguments

    original = BlockArguments.call
    monkeypatch.setattr(BlockArguments, "call", lambda self, index, batch_size: original(self, 0, batch_size))
    job = make_job(family_dir("gemma3"), tmp_path / "out", "wanda", sparsity=0.5, calib=small_calib_file,
                   n_samples=2, seq_len=SEQ_LEN, micro_batch=2)
    with pytest.raises(ValueError, match=r"streamed forward differs from the model's own forward by .* block 3 of 4"):
        run_job(job)
    assert not (tmp_path / "out").exists()  # nothing written


def test_without_the_door_check_the_wrong_arguments_stream_another_model(family_dir, monkeypatch):
    """The same patch, checked against the matrix's first row: the logits move far beyond the bound."""
    from calib.capture import BlockArguments

    folder = family_dir("gemma3")
    windows = [random_windows(2)]
    whole = torch.cat([logits for _, _, logits in InMemoryLM(folder, CPU, torch.float64).logits(windows, 2)])
    original = BlockArguments.call
    monkeypatch.setattr(BlockArguments, "call", lambda self, index, batch_size: original(self, 0, batch_size))
    streamed = torch.cat([logits for _, _, logits in StreamedLM(folder, CPU, torch.float64).logits(windows, 2)])
    bound = forward_bound(whole, FAMILIES["gemma3"](), torch.float64)
    assert bool(((streamed - whole).abs() > 1e6 * bound).any())
