"""PIQA zero-shot accuracy from the excerpt in ``tests/data/piqa`` (the first 100 validation questions), scored as lm-evaluation-harness scores it.

The hand computation below follows lm-eval's recipe directly (context ``"Question: {goal}\\nAnswer:"``,
continuation ``" " + sol``, continuation tokens = ``encode(context + continuation)[len(encode(context)):]``,
summed log-probabilities of those tokens from one unpadded forward per choice; acc_norm divides by
the length of the choice string) and must agree with the batched, right-padded scorer.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from cli import app
from conftest import PIQA_DATA, TEST_DATA
from tolerances import gamma
from reconstruct.evaluation.streaming import InMemoryLM, StreamedLM
from reconstruct.evaluation.zero_shot import evaluate_tasks, load_piqa, piqa_folder, score_multiple_choice

PIQA = PIQA_DATA
PIQA_ITEMS = 100  # questions in the excerpt
CPU = torch.device("cpu")


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

    docs = load_piqa(PIQA, limit=3)
    metrics, items = score_multiple_choice(InMemoryLM(folder, CPU, torch.float64), tokenizer, docs, batch_size=2)
    bounds = [[float32_log_softmax_bound(model, tokenizer, row["goal"], row[key]) for key in ("sol1", "sol2")]
              for row in rows]
    for item, lls, bound, pred, pred_norm, label in zip(items, expected_lls, bounds, expected_pred, expected_norm, labels):
        for got, want, tolerance in zip(item["loglikelihoods"], lls, bound):
            assert got == pytest.approx(want, rel=0, abs=tolerance)
        assert (item["pred"], item["pred_norm"], item["label"]) == (pred, pred_norm, label)
    assert metrics["n"] == 3
    # a count over 3, one correctly rounded division of integers on both sides: exact
    assert metrics["acc"] == sum(p == y for p, y in zip(expected_pred, labels)) / 3
    assert metrics["acc_norm"] == sum(p == y for p, y in zip(expected_norm, labels)) / 3


def test_accuracy_in_unit_interval_and_streamed_equals_in_memory(tiny_model_dir):
    folder = tiny_model_dir("gpt2")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    docs = load_piqa(PIQA, limit=40)
    whole, whole_items = score_multiple_choice(InMemoryLM(folder, CPU, torch.float32), tokenizer, docs, batch_size=8)
    streamed, streamed_items = score_multiple_choice(StreamedLM(folder, CPU, torch.float32), tokenizer, docs, batch_size=8)
    assert whole["n"] == streamed["n"] == 40
    for metrics in (whole, streamed):
        assert 0.0 <= metrics["acc"] <= 1.0 and 0.0 <= metrics["acc_norm"] <= 1.0
        assert metrics["acc"] == round(metrics["acc"] * 40) / 40  # a share of 40 questions (k / 40, rounded once)
    for a, b in zip(whole_items, streamed_items):
        # the same modules on the same micro-batches (streaming only moves the hidden states): the same bits
        assert a["loglikelihoods"] == b["loglikelihoods"]
    assert (whole["acc"], whole["acc_norm"]) == (streamed["acc"], streamed["acc_norm"])


def test_all_items_load():
    docs = load_piqa(PIQA)
    assert len(docs) == PIQA_ITEMS
    assert docs[0].context.startswith("Question: ") and docs[0].context.endswith("\nAnswer:")
    assert {doc.label for doc in docs} == {0, 1}


def test_task_data_is_the_piqa_folder_or_its_parent(tmp_path):
    assert piqa_folder(PIQA) == PIQA
    assert piqa_folder(TEST_DATA) == PIQA
    with pytest.raises(ValueError, match="--task-data"):
        piqa_folder(None)
    with pytest.raises(ValueError, match="no valid.jsonl"):
        piqa_folder(tmp_path)
    broken = tmp_path / "piqa"
    shutil.copytree(PIQA, broken)
    (broken / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(ValueError, match=f"{PIQA_ITEMS} questions but 2 labels"):
        load_piqa(tmp_path)


def test_other_tasks_need_lm_eval(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ValueError, match="lm-eval"):
        evaluate_tasks(str(tiny_model_dir("llama")), ["hellaswag"], device="cpu")


def test_cli_eval_tasks_piqa(tiny_model_dir):
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir("opt")), "--tasks", "piqa",
                                      "--task-data", str(TEST_DATA), "--limit", "6", "--batch-size", "4",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert "perplexity" not in output  # no --data: tasks only
    piqa = output["tasks"]["piqa"]
    assert piqa["n"] == 6 and 0.0 <= piqa["acc"] <= 1.0 and 0.0 <= piqa["acc_norm"] <= 1.0
    missing = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir("opt")), "--tasks", "piqa", "--device", "cpu"])
    if missing.exit_code != 0:  # without lm-eval installed: one clear line naming --task-data
        assert missing.exit_code == 2 and "--task-data" in missing.output
