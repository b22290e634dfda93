"""PIQA zero-shot accuracy from the excerpt in ``tests/data/piqa`` (its first 100 validation questions), through lm-eval's own ``piqa`` task on ``ReconstructLM``.

The hand computation below follows lm-eval's recipe directly (context ``"Question: {goal}\\nAnswer:"``,
continuation ``" " + sol``, continuation tokens = ``encode(context + continuation)[len(encode(context)):]``,
summed log-probabilities of those tokens from one unpadded forward per choice; acc_norm divides by
the length of the choice string) and must agree with lm-eval's task run on the batched, right-padded
``ReconstructLM``.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from cli import app
from conftest import TEST_DATA
from tolerances import gamma

pytest.importorskip("lm_eval")
from calib.framing import resolve_framing  # noqa: E402
from reconstruct.evaluation.lm_eval_model import ReconstructLM  # noqa: E402
from reconstruct.evaluation.streaming import InMemoryLM  # noqa: E402
from reconstruct.evaluation.task_data import task_specs  # noqa: E402
from reconstruct.evaluation.tasks import load_tasks, evaluate_tasks, run_lm_eval  # noqa: E402

pytestmark = pytest.mark.usefixtures("lm_eval_task_index")  # conftest: lm-eval's task scan once per process
PIQA = TEST_DATA / "piqa"
PIQA_ITEMS = len((PIQA / "valid-labels.lst").read_text().split())
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def hand_loglikelihood(model, tokenizer, goal: str, solution: str) -> float:
    context = f"Question: {goal}\nAnswer:"
    whole = tokenizer(context + " " + solution, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    continuation = whole[len(context_ids):]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole])).logits[0].double()  # (T, V)
    log_probs = torch.log_softmax(logits, dim=-1)
    return sum(float(log_probs[len(context_ids) - 1 + j, token]) for j, token in enumerate(continuation))


def float32_log_softmax_bound(model, tokenizer, goal: str, solution: str) -> float:
    """Rounding bound of summing the continuation's float32 log-softmax values (see the test below)."""
    context = f"Question: {goal}\nAnswer:"
    whole = tokenizer(context + " " + solution, add_special_tokens=False)["input_ids"]
    n_cont = len(whole) - len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole])).logits[0]  # (T, V)
    u = torch.finfo(torch.float32).eps / 2
    return n_cont * (gamma(logits.shape[-1]) + 4 * u * float(logits.abs().max()))


def test_three_items_equal_a_hand_computed_loglikelihood_comparison(tiny_model_dir):
    folder = tiny_model_dir("llama")
    rows = [json.loads(line) for line in (PIQA / "valid.jsonl").read_text().splitlines()[:3]]
    labels = [int(label) for label in (PIQA / "valid-labels.lst").read_text().split()[:3]]
    # float64 models on both sides, so the network's rounding is negligible (float64); what remains is the
    # scorer's float32 log-softmax: per continuation token at most gamma_V (the sum of V exponentials) plus
    # a few roundings of the logits' size, so c tokens stay within c * (gamma_V + 4 u max|logit|).
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    expected_lls = [[hand_loglikelihood(model, tokenizer, row["goal"], row[key]) for key in ("sol1", "sol2")] for row in rows]
    expected_pred = [max((0, 1), key=lambda i, lls=lls: lls[i]) for lls in expected_lls]
    expected_norm = [max((0, 1), key=lambda i, lls=lls, row=row: lls[i] / len(row[f"sol{i + 1}"]))
                     for lls, row in zip(expected_lls, rows)]

    build = lambda: ReconstructLM(InMemoryLM(folder, CPU, torch.float64), tokenizer,  # noqa: E731
                                  resolve_framing(tokenizer, "auto"), batch_size=2)
    output, _ = run_lm_eval(build, ["piqa"], TEST_DATA, limit=3, log_samples=True)
    samples = sorted(output["samples"]["piqa"], key=lambda sample: sample["doc_id"])
    bounds = [[float32_log_softmax_bound(model, tokenizer, row["goal"], row[key]) for key in ("sol1", "sol2")]
              for row in rows]
    for sample, lls, bound, pred, pred_norm, label in zip(samples, expected_lls, bounds, expected_pred, expected_norm, labels):
        got = [float(response[0]) for response in sample["filtered_resps"]]
        for value, want, tolerance in zip(got, lls, bound):
            assert value == pytest.approx(want, rel=0, abs=tolerance)
        assert sample["target"] == label
        assert (sample["acc"], sample["acc_norm"]) == (float(pred == label), float(pred_norm == label))
    piqa = output["results"]["piqa"]
    # a count over 3, one correctly rounded division of integers on both sides: exact
    assert piqa["acc,none"] == sum(p == y for p, y in zip(expected_pred, labels)) / 3
    assert piqa["acc_norm,none"] == sum(p == y for p, y in zip(expected_norm, labels)) / 3


def test_accuracy_in_unit_interval_and_streamed_equals_in_memory(tiny_model_dir):
    folder = str(tiny_model_dir("gpt2"))
    common = dict(task_data=TEST_DATA, limit=40, device="cpu", batch_size=8)
    whole = evaluate_tasks(folder, ["piqa"], stream=False, **common)["piqa"]
    streamed = evaluate_tasks(folder, ["piqa"], stream=True, **common)["piqa"]
    assert (whole["streamed"], streamed["streamed"]) == (False, True)
    assert whole["n"] == streamed["n"] == 40
    for metrics in (whole, streamed):
        assert 0.0 <= metrics["acc"] <= 1.0 and 0.0 <= metrics["acc_norm"] <= 1.0
        assert metrics["acc"] == round(metrics["acc"] * 40) / 40  # a share of 40 questions (k / 40, rounded once)
    # the same modules on the same micro-batches (streaming only moves the hidden states): the same bits
    assert (whole["acc"], whole["acc_norm"]) == (streamed["acc"], streamed["acc_norm"])


def test_all_items_load_from_the_folder_or_its_parent(tmp_path):
    from lm_eval.tasks import TaskManager

    manager = TaskManager()
    for task_data in (TEST_DATA, PIQA):
        loaded = load_tasks(manager, task_specs(["piqa"], task_data, manager, tmp_path), ["piqa"])
        docs = list(loaded["tasks"]["piqa"].eval_docs)
        assert len(docs) == PIQA_ITEMS
        assert {doc["label"] for doc in docs} == {0, 1}
        assert loaded["tasks"]["piqa"].doc_to_text(docs[0]).startswith("Question: ")


def test_cli_eval_tasks_piqa(tiny_model_dir):
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir("opt")), "--tasks", "piqa",
                                      "--task-data", str(TEST_DATA), "--limit", "6", "--batch-size", "4",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert "perplexity" not in output  # no --data: tasks only
    piqa = output["tasks"]["piqa"]
    assert piqa["n"] == 6 and 0.0 <= piqa["acc"] <= 1.0 and 0.0 <= piqa["acc_norm"] <= 1.0
