"""Sequences as the model reads them: every window starts with the BOS exactly when the tokenizer adds one.

Two tiny LLaMA models share weights: one keeps conftest's word tokenizer (it has a ``<s>`` token but
does not add it, like SmolLM2's), the other's tokenizer puts ``<s>`` in front of every text through a
post-processor (like LLaMA-2/3 and Mistral). Calibration (text and ``self``), perplexity windows and
zero-shot requests must start with the BOS on the second and never on the first.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from typer.testing import CliRunner

from calib.framing import SequenceFraming, resolve_framing, tokenizer_bos_id
from calib.self_generated import generate_self_calibration
from calib.text_sources import consecutive_windows, read_text, sample_windows, tokenize_text
from cli import app
from reconstruct.evaluation.perplexity import perplexity
from tests.conftest import VOCAB_SIZE, WIKITEXT_VALID, build_word_tokenizer, make_job

BOS_ID = 1  # "<s>" in conftest's word tokenizer
EOS_ID = 2
CPU = torch.device("cpu")


def adding_tokenizer(single: str, specials: list[tuple[str, int]]) -> PreTrainedTokenizerFast:
    """Conftest's word tokenizer with a post-processor template such as ``"<s> $A"``."""
    tokenizer = build_word_tokenizer(WIKITEXT_VALID, VOCAB_SIZE)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    return tokenizer


def bosless_tokenizer() -> PreTrainedTokenizerFast:
    """A word tokenizer with no BOS token at all."""
    backend = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "</s>": 1, "the": 2, "a": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


@pytest.fixture(scope="module")
def plain_model(tiny_model_dir) -> Path:
    """Tiny LLaMA whose tokenizer adds no BOS."""
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def bos_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The same tiny LLaMA with a tokenizer that puts ``<s>`` first."""
    folder = tmp_path_factory.mktemp("tiny-llama-bos")
    for path in tiny_model_dir("llama").iterdir():
        if path.is_file():
            shutil.copy(path, folder / path.name)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    adding_tokenizer("<s> $A", [("<s>", BOS_ID)]).save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder)("the")["input_ids"][0] == BOS_ID
    return folder


# --------------------------------------------------------------------------- detection
@pytest.mark.parametrize("tokenizer, expected", [
    (build_word_tokenizer(WIKITEXT_VALID, VOCAB_SIZE), None),  # has <s>, does not add it
    (adding_tokenizer("<s> $A", [("<s>", BOS_ID)]), BOS_ID),
    (adding_tokenizer("$A </s>", [("</s>", EOS_ID)]), None),  # EOS at the end only
    (adding_tokenizer("<s> $A </s>", [("<s>", BOS_ID), ("</s>", EOS_ID)]), BOS_ID),
    (bosless_tokenizer(), None),
], ids=["has-bos-adds-none", "adds-bos", "adds-eos", "adds-bos-and-eos", "no-bos-token"])
def test_bos_detected_from_what_the_tokenizer_adds(tokenizer, expected):
    assert tokenizer_bos_id(tokenizer) == expected
    assert resolve_framing(tokenizer, "auto").bos_id == expected
    assert resolve_framing(tokenizer, "never").bos_id is None


def test_always_uses_the_bos_token_and_refuses_a_tokenizer_without_one():
    assert resolve_framing(build_word_tokenizer(WIKITEXT_VALID, VOCAB_SIZE), "always").bos_id == BOS_ID
    with pytest.raises(ValueError, match="--calib-bos always"):
        resolve_framing(bosless_tokenizer(), "always")
    with pytest.raises(ValueError, match="--calib-bos must be one of"):
        resolve_framing(bosless_tokenizer(), "sometimes")


# --------------------------------------------------------------------------- windows
def test_text_windows_are_bos_plus_text_or_text_only():
    ids = torch.arange(10, 1010)  # (L,): ids never equal to the BOS
    framing = SequenceFraming(BOS_ID)
    framed = sample_windows(ids, 6, 16, seed=3, framing=framing)  # (6, 16)
    assert framed.shape == (6, 16)
    assert (framed[:, 0] == BOS_ID).all()
    assert ((framed[:, 2:] - framed[:, 1:-1]) == 1).all()  # 15 consecutive text tokens after the BOS
    plain = sample_windows(ids, 6, 16, seed=3)
    starts = np.random.default_rng(3).integers(0, ids.numel() - 16, size=6)  # the offsets as drawn before framing
    assert torch.equal(plain, torch.stack([ids[s : s + 16] for s in starts.tolist()]))

    evaluation = consecutive_windows(ids, 16, None, framing=framing)  # (n, 16)
    assert (evaluation[:, 0] == BOS_ID).all()
    assert torch.equal(evaluation[:, 1:].reshape(-1), ids[: evaluation.shape[0] * 15])  # every text token once
    assert torch.equal(consecutive_windows(ids, 16, None), ids[: 62 * 16].view(62, 16))


@pytest.mark.parametrize("framing", [SequenceFraming(None), SequenceFraming(BOS_ID)], ids=["no-bos", "bos"])
def test_self_generated_sequences_start_from_the_bos(plain_model, framing):
    tokens = generate_self_calibration(plain_model, 5, 8, seed=0, device=CPU, dtype=torch.float32,
                                       batch_size=2, framing=framing)  # (5, 8)
    assert tokens.shape == (5, 8)
    if framing.bos_id is None:  # unchanged: a uniformly drawn first token, seeded
        expected = torch.randint(0, VOCAB_SIZE, (5, 1), generator=torch.Generator().manual_seed(0))
        assert torch.equal(tokens[:, :1], expected)
    else:
        assert (tokens[:, 0] == BOS_ID).all()


# --------------------------------------------------------------------------- the job
def _run(model: Path, out: Path, calib, bos: str = "auto", n_samples: int = 4):
    from reconstruct.jobs.run_job import run_job

    job = make_job(model, out, "magnitude", sparsity=0.5, calib=calib, n_samples=n_samples, seq_len=16)
    job = dataclasses.replace(job, calib=dataclasses.replace(job.calib, bos=bos))
    return job, run_job(job)


def _calibration_tokens(out: Path) -> torch.Tensor:
    return load_file(out / ".reconstruct" / "calibration-tokens.safetensors")["tokens"]  # (n, T)


@pytest.mark.parametrize("model_name, bos, expected", [
    ("plain", "auto", None), ("bos", "auto", BOS_ID), ("bos", "never", None), ("plain", "always", BOS_ID),
])
def test_job_calibration_windows_and_record(plain_model, bos_model, small_calib_file, tmp_path, model_name, bos, expected):
    model = bos_model if model_name == "bos" else plain_model
    job, report = _run(model, tmp_path / "out", small_calib_file, bos)
    tokens = _calibration_tokens(job.out)
    if expected is None:
        assert not (tokens[:, 0] == BOS_ID).any()
        assert "bos_id" not in report["job"]["calibration"]  # fingerprint as before this framing existed
    else:
        assert (tokens[:, 0] == BOS_ID).all()
        assert report["job"]["calibration"]["bos_id"] == expected
    recorded = json.loads((job.out / "reconstruct.json").read_text())
    assert recorded["framing"] == {"calib_bos": bos, "bos_id": expected}
    markdown = (job.out / "report.md").read_text()
    assert ("windows without BOS" if expected is None else f"windows start with BOS id {expected}") in markdown


def test_self_calibration_job_starts_from_the_bos(bos_model, tmp_path):
    job, _ = _run(bos_model, tmp_path / "out", "self", n_samples=2)
    assert (_calibration_tokens(job.out)[:, 0] == BOS_ID).all()


def test_resume_refuses_a_changed_calib_bos(bos_model, plain_model, small_calib_file, tmp_path):
    _run(bos_model, tmp_path / "bos", small_calib_file, "auto")
    with pytest.raises(ValueError, match="--calib-bos"):
        _run(bos_model, tmp_path / "bos", small_calib_file, "never")
    _run(plain_model, tmp_path / "plain", small_calib_file, "auto")
    _, again = _run(plain_model, tmp_path / "plain", small_calib_file, "never")  # same framing: the same job
    assert again.get("already_finished")


# --------------------------------------------------------------------------- evaluation
def reference_perplexity(folder: Path, text: str, seq_len: int, max_windows: int) -> float:
    """A plain transformers loop: BOS + (seq_len - 1) text tokens per window, the BOS position not scored."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    total, count = 0.0, 0
    for index in range(max_windows):
        chunk = ids[index * (seq_len - 1) : (index + 1) * (seq_len - 1)]
        window = torch.tensor([[tokenizer.bos_token_id, *chunk]])  # (1, T)
        with torch.no_grad():
            logits = model(input_ids=window).logits[0, :-1]  # (T-1, V): predictions of every text token
        total += float(torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum"))
        count += len(chunk)
    return math.exp(total / count)


@pytest.mark.parametrize("stream", [False, True], ids=["in-memory", "streamed"])
def test_eval_perplexity_equals_a_plain_loop_with_bos(bos_model, small_calib_file, stream):
    result = perplexity(str(bos_model), str(small_calib_file), seq_len=16, max_windows=4, device="cpu", stream=stream)
    expected = reference_perplexity(bos_model, read_text(str(small_calib_file)), 16, 4)
    assert result["bos_id"] == BOS_ID and result["windows"] == 4
    # the same float32 forward on the same tokens; the NLL sums 60 terms of a few nats each, so
    # summation-order differences stay far below 1e-5 relative (60 * 2^-24 * 10 nats / 60 tokens)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_eval_without_bos_is_unchanged(plain_model, small_calib_file):
    tokenizer = AutoTokenizer.from_pretrained(plain_model)
    ids = tokenize_text(read_text(str(small_calib_file)), tokenizer)
    assert torch.equal(consecutive_windows(ids, 16, 4, framing=resolve_framing(tokenizer)), ids[:64].view(4, 16))
    assert perplexity(str(plain_model), str(small_calib_file), seq_len=16, max_windows=4, device="cpu")["bos_id"] is None


class RecordingLM:
    """Stands in for an LM: records the token sets it is asked about, returns uniform logits."""

    def __init__(self):
        self.token_sets: list[torch.Tensor] = []

    def logits(self, token_sets, micro_batch, desc: str = "eval"):
        self.token_sets = token_sets
        for set_index, tokens in enumerate(token_sets):
            yield set_index, slice(0, tokens.shape[0]), torch.zeros(*tokens.shape, VOCAB_SIZE)  # (b, T, V)


@pytest.mark.parametrize("framing", [SequenceFraming(None), SequenceFraming(BOS_ID)], ids=["no-bos", "bos"])
def test_zero_shot_requests_start_with_the_bos(framing):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from reconstruct.evaluation.lm_eval_model import ReconstructLM

    tokenizer = build_word_tokenizer(WIKITEXT_VALID, VOCAB_SIZE)
    requests = [Instance("loglikelihood", {}, ("Question: the first\nAnswer:", " " + choice), index)
                for index, choice in enumerate(("of the", "in a"))]
    lm = RecordingLM()
    ReconstructLM(lm, tokenizer, framing, batch_size=1, max_length=64).loglikelihood(requests)
    first = [int(tokens[0, 0]) for tokens in lm.token_sets]
    context = tokenizer("Question: the first\nAnswer:", add_special_tokens=False)["input_ids"]
    assert first == [BOS_ID if framing.bos_id is not None else context[0]] * 2


# --------------------------------------------------------------------------- command line
def test_calib_bos_always_without_a_bos_token_exits_2(plain_model, small_calib_file, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(plain_model, folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    bosless_tokenizer().save_pretrained(folder)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", "--model", str(folder), "--calib", str(small_calib_file), "--n-samples", "2",
                                      "--seq-len", "16", "--device", "cpu", "--calib-bos", "always", "--out", str(out)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--calib-bos always" in errors[0], result.output
    assert not out.exists()
    evaluated = CliRunner().invoke(app, ["eval", "--model", str(folder), "--data", str(small_calib_file),
                                         "--device", "cpu", "--calib-bos", "always"])
    assert evaluated.exit_code == 2 and "--calib-bos always" in evaluated.output


def test_sweep_and_plan_pass_calib_bos_on():
    from reconstruct.cli import parse_args
    from reconstruct.cli.job_options import PLAN, SWEEP_SHARED, build_job
    from reconstruct.cli.options import command_line
    from reconstruct.cli.sweep import SWEEP

    assert "--calib-bos" in {option.flag.name for option in SWEEP} & {option.flag.name for option in PLAN}
    params = parse_args("sweep", ["--eval", "t.txt", "--out", "o", "--calib-bos", "never"])
    assert command_line(SWEEP_SHARED, params) == ["--calib-bos", "never"]  # every sweep cell's `run` gets it
    assert build_job(parse_args("plan", ["--calib-bos", "never"])).calib.bos == "never"
