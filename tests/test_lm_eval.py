"""The model as an lm-eval model: streamed log-likelihoods equal the in-memory ones, each block read once per call.

``ReconstructLM`` (``reconstruct/evaluation/lm_eval_model.py``) serves lm-eval's requests from the
in-memory or the block-streamed forward; ``evaluate_tasks`` runs lm-eval's task definitions on it,
with local data from ``--task-data`` (``tests/data/lm_eval``: six PIQA items in PIQA's release
format, and ``tiny_mc``, a made-up multiple-choice task in lm-eval's YAML format).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer
from typer.testing import CliRunner

from cli import app
from conftest import VOCAB_SIZE
from tolerances import forward_bound, gamma

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from calib.framing import SequenceFraming, resolve_framing  # noqa: E402
from reconstruct.evaluation.lm_eval_model import ReconstructLM  # noqa: E402
from reconstruct.evaluation.streaming import InMemoryLM, StreamedLM  # noqa: E402
from reconstruct.evaluation.tasks import evaluate_tasks, metric_table, run_lm_eval  # noqa: E402
from reconstruct.modelio import loaded as loaded_module  # noqa: E402

pytestmark = pytest.mark.usefixtures("lm_eval_task_index")  # conftest: lm-eval's task scan once per process
TASK_DATA = Path(__file__).parent / "data" / "lm_eval"
CPU = torch.device("cpu")
U32 = torch.finfo(torch.float32).eps / 2

CONTEXTS = [  # (context, continuation): several lengths, a shared context, a trailing space moved, a long one
    ("the first of the", " city and the"),
    ("the first of the", " year"),
    ("he was a", " member of the new"),
    ("in the United States ", "and the"),
    ("it was the " * 20, "first time"),
    ("the game was", " released in"),
    ("a", " b"),
]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def requests(kind: str = "loglikelihood") -> list[Instance]:
    if kind == "loglikelihood_rolling":
        return [Instance(kind, {}, (context + continuation,), index) for index, (context, continuation) in enumerate(CONTEXTS)]
    return [Instance(kind, {}, pair, index) for index, pair in enumerate(CONTEXTS)]


def model_lm(folder: Path, lm, batch_size: int = 2, **kwargs) -> ReconstructLM:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return ReconstructLM(lm, tokenizer, resolve_framing(tokenizer, "auto"), batch_size, **kwargs)


def count_block_reads(monkeypatch, prefix_of_block) -> dict[str, int]:
    """Count block loads of the streamed model (``LoadedModel.visiting_block``), by block prefix."""
    reads: dict[str, int] = {}
    real = loaded_module.load_module_weights

    def counting(module, prefix, *args, **kwargs):
        if prefix_of_block(prefix):
            reads[prefix] = reads.get(prefix, 0) + 1
        return real(module, prefix, *args, **kwargs)

    monkeypatch.setattr(loaded_module, "load_module_weights", counting)
    return reads


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("kind", ["loglikelihood", "loglikelihood_rolling"])
def test_streamed_loglikelihoods_equal_in_memory_and_each_block_is_read_once(tiny_model_dir, monkeypatch, arch, kind):
    folder = tiny_model_dir(arch)
    memory = model_lm(folder, InMemoryLM(folder, CPU, torch.float32))
    streamed = model_lm(folder, StreamedLM(folder, CPU, torch.float32))
    layout = streamed.lm.loaded.layout
    block_prefixes = {layout.block_prefix(index) for index in range(layout.n_blocks)}
    reads = count_block_reads(monkeypatch, block_prefixes.__contains__)

    expected = getattr(memory, kind)(requests(kind))
    got = getattr(streamed, kind)(requests(kind))

    # one call, 7 requests in 4 micro-batches: every block read once, in one pass
    assert reads == {prefix: 1 for prefix in block_prefixes} and streamed.passes == 1
    # The network runs the same modules on the same right-padded micro-batches either way, so the logits
    # are the same bits (tests/test_streaming_eval.py checks that on its own). What each side adds is
    # its float32 log-softmax of each scored position: at most gamma_V (the sum of V exponentials) plus
    # a few roundings of max|z| (4 u max|z|, as tests/test_piqa.py derives). A request of c scored
    # tokens: c (gamma_V + 4 u max|z|) per side, twice that between the two.
    reference = memory.lm.model
    for index, (want, have) in enumerate(zip(expected, got)):
        tokens = memory.tok_encode(CONTEXTS[index][0] + CONTEXTS[index][1])
        with torch.no_grad():  # the largest logit either way of framing this request (with the rolling prefix or not)
            max_logit = max(float(reference(input_ids=torch.tensor([ids])).logits.abs().max())
                            for ids in (tokens, [memory.prefix_token_id] + tokens))
        bound = 2 * (len(tokens) + 1) * (gamma(VOCAB_SIZE) + 4 * U32 * max_logit)  # c <= len(tokens) + 1 scored tokens
        want_ll, have_ll = (want[0], have[0]) if kind == "loglikelihood" else (want, have)
        assert have_ll == pytest.approx(want_ll, rel=0, abs=bound), index
        if kind == "loglikelihood":
            assert have[1] == want[1]


def test_a_small_memory_budget_splits_a_call_into_passes_that_each_read_every_block_once(tiny_model_dir, monkeypatch):
    folder = tiny_model_dir("llama")
    whole = model_lm(folder, StreamedLM(folder, CPU, torch.float32))
    split = model_lm(folder, StreamedLM(folder, CPU, torch.float32), pass_bytes=1)  # every micro-batch its own pass
    layout = split.lm.loaded.layout
    reads = count_block_reads(monkeypatch, lambda prefix: prefix in {layout.block_prefix(i) for i in range(layout.n_blocks)})
    expected = whole.loglikelihood(requests())
    reads.clear()
    got = split.loglikelihood(requests())
    assert split.passes == 4  # 7 requests in micro-batches of 2, each micro-batch its own pass
    assert set(reads.values()) == {split.passes}
    assert got == expected  # the same micro-batches through the same modules: the same bits


def test_equals_lm_evals_own_hflm_item_by_item(tiny_model_dir):
    """PIQA (six items, release format) and the made-up task: HFLM, in memory and streamed agree bit for bit."""
    folder = tiny_model_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    framing = resolve_framing(tokenizer, "auto")
    builders = {
        "hflm": lambda: HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=3),
        "memory": lambda: ReconstructLM(InMemoryLM(folder, CPU, torch.float32), tokenizer, framing, 3),
        "stream": lambda: ReconstructLM(StreamedLM(folder, CPU, torch.float32), tokenizer, framing, 3),
    }
    samples = {}
    for way, build in builders.items():
        output, _ = run_lm_eval(build, ["piqa", "tiny_mc"], TASK_DATA, log_samples=True)
        assert metric_table(output)["piqa"]["n"] == 6 and metric_table(output)["tiny_mc"]["n"] == 5
        samples[way] = {task: [(s["doc_id"], s["filtered_resps"], s["acc"], s["acc_norm"]) for s in rows]
                        for task, rows in output["samples"].items()}
    # HFLM and ReconstructLM build the same right-padded batches in the same order (lm-eval's Collator)
    # and run the same modules: the same bits, so every item's acc and acc_norm agree too
    assert samples["memory"] == samples["hflm"]
    assert samples["stream"] == samples["hflm"]


def test_a_tokenizer_that_adds_a_bos_gets_it_as_from_hflm(tiny_model_dir, tmp_path):
    """BOS as lm-eval's HFLM adds it (its default add_bos_token=None: whatever the tokenizer adds) = calib.framing's."""
    import shutil

    from test_framing import BOS_ID, adding_tokenizer

    folder = tmp_path / "bos"
    shutil.copytree(tiny_model_dir("llama"), folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    adding_tokenizer("<s> $A", [("<s>", BOS_ID)]).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    framing = resolve_framing(tokenizer, "auto")
    assert framing.bos_id == BOS_ID
    # float64 on both sides: HFLM may batch the rolling windows otherwise than ReconstructLM (other GEMM
    # shapes, another summation order), so the two agree within a bound, not bit for bit; a misplaced BOS
    # moves a log-likelihood by orders of magnitude more than the bound
    ours = ReconstructLM(StreamedLM(folder, CPU, torch.float64), tokenizer, framing, 2)
    theirs = HFLM(pretrained=str(folder), device="cpu", dtype="float64", batch_size=2)
    config = theirs.model.config
    for kind in ("loglikelihood", "loglikelihood_rolling"):
        for index, (have, want) in enumerate(zip(getattr(ours, kind)(requests(kind)),
                                                 getattr(theirs, kind)(requests(kind)))):
            have_ll, want_ll = (have[0], want[0]) if kind == "loglikelihood" else (have, want)
            tokens = theirs.tok_encode(CONTEXTS[index][0] + CONTEXTS[index][1])
            with torch.no_grad():
                logits = theirs.model(input_ids=torch.tensor([tokens])).logits
            logit_bound = float(forward_bound(logits, config, torch.float64).max())
            u64, max_logit = torch.finfo(torch.float64).eps / 2, float(logits.abs().max())
            # each scored token's log-softmax: twice the logits' bound, plus each side's own rounding
            # (gamma_V + 4 u max|z|): HFLM's in float64, ReconstructLM's in float32 (it scores in float32)
            per_token = (2 * logit_bound + gamma(VOCAB_SIZE, torch.float64) + 4 * u64 * max_logit
                         + gamma(VOCAB_SIZE) + 4 * U32 * max_logit)
            assert have_ll == pytest.approx(want_ll, rel=0, abs=(len(tokens) + 1) * per_token), (kind, index)
            if kind == "loglikelihood":
                assert have[1] == want[1]
    assert ours.tok_encode("the first")[0] == theirs.tok_encode("the first")[0] == BOS_ID
    assert ours.max_length == theirs.max_length == 256


def test_custom_task_from_local_data_through_the_command_line(tiny_model_dir):
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir("opt")), "--tasks", "tiny_mc,piqa",
                                      "--task-data", str(TASK_DATA), "--batch-size", "4", "--device", "cpu", "--stream"])
    assert result.exit_code == 0, result.output
    tasks = json.loads(result.stdout.strip().splitlines()[-1])["tasks"]
    assert (tasks["tiny_mc"]["n"], tasks["piqa"]["n"]) == (5, 6)
    for row in tasks.values():
        assert row["streamed"] is True and row["bos_id"] is None and row["max_length"] == 256
        assert row["acc"] * row["n"] == pytest.approx(round(row["acc"] * row["n"]))  # a share of the items


def test_bos_framing_reaches_every_request(tiny_model_dir):
    folder = tiny_model_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    seen = []

    class Recording:
        config, streamed, device = InMemoryLM(folder, CPU, torch.float32).config, False, CPU

        def logits(self, token_sets, micro_batch, desc="eval"):
            seen.extend(tokens for tokens in token_sets)
            for index, tokens in enumerate(token_sets):
                yield index, slice(0, tokens.shape[0]), torch.zeros(*tokens.shape, VOCAB_SIZE)  # (b, T, V)

    for framing, first in ((SequenceFraming(1), {1}), (SequenceFraming(None), None)):
        seen.clear()
        ReconstructLM(Recording(), tokenizer, framing).loglikelihood(requests())
        starts = {int(tokens[row, 0]) for tokens in seen for row in range(tokens.shape[0])}
        assert starts == first if first else 1 not in starts


def test_generative_tasks_are_refused_before_the_model_loads(tmp_path):
    folder = tmp_path / "tiny_gen"
    folder.mkdir()
    (folder / "test.jsonl").write_text('{"q": "the", "a": "first"}\n')
    (folder / "tiny_gen.yaml").write_text("task: tiny_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                          "    test: test.jsonl\noutput_type: generate_until\ntest_split: test\n"
                                          "doc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
                                          "metric_list:\n  - metric: exact_match\n")
    with pytest.raises(ValueError, match="generate_until"):
        run_lm_eval(lambda: pytest.fail("the model must not load"), ["tiny_gen"], tmp_path)


def test_user_errors_name_the_fix(tiny_model_dir, tmp_path, monkeypatch):
    model = str(tiny_model_dir("llama"))
    with pytest.raises(ValueError, match="not a task, group or tag lm-eval knows"):
        evaluate_tasks(model, ["no_such_task"], device="cpu")
    broken = tmp_path / "piqa"
    broken.mkdir()
    (broken / "valid.jsonl").write_text((TASK_DATA / "piqa" / "valid.jsonl").read_text())
    (broken / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(ValueError, match="6 rows in valid.jsonl but 2 labels"):
        evaluate_tasks(model, ["piqa"], tmp_path, device="cpu")
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ValueError, match=r'pip install -e "\.\[eval\]"'):
        evaluate_tasks(model, ["piqa"], device="cpu")
    result = CliRunner().invoke(app, ["eval", "--model", model, "--tasks", "piqa", "--device", "cpu"])
    assert result.exit_code == 2 and "[eval]" in result.output


def test_a_registered_task_reads_split_files_in_its_datasets_schema(tiny_model_dir, tmp_path):
    """lm-eval's own arc_easy (prompt, choices, metrics) on two made-up rows in allenai/ai2_arc's schema."""
    folder = tmp_path / "arc_easy"
    folder.mkdir()
    rows = [{"id": "q1", "question": "the first of the", "answerKey": "B",
             "choices": {"text": ["city", "year", "game"], "label": ["A", "B", "C"]}},
            {"id": "q2", "question": "he was a", "answerKey": "1",
             "choices": {"text": ["member", "new"], "label": ["1", "2"]}}]
    (folder / "validation.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match="evaluates on its test split; add test.jsonl"):
        evaluate_tasks(str(tiny_model_dir("llama")), ["arc_easy"], tmp_path, device="cpu")
    (folder / "validation.jsonl").rename(folder / "test.jsonl")
    table = evaluate_tasks(str(tiny_model_dir("llama")), ["arc_easy"], tmp_path, device="cpu", batch_size=2)
    assert table["arc_easy"]["n"] == 2 and table["arc_easy"]["acc"] in (0.0, 0.5, 1.0)
