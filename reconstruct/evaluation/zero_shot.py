"""Zero-shot multiple-choice accuracy, offline: PIQA scored the way lm-evaluation-harness scores it.

lm-eval's ``piqa`` task (``lm_eval/tasks/piqa/piqa.yaml``) is ``output_type: multiple_choice`` with
context ``"Question: {goal}\\nAnswer:"``, choices ``[sol1, sol2]`` and the default target delimiter
``" "``, so each choice is scored as the continuation ``" " + sol``:

- tokens as ``TemplateLM._encode_pair``: trailing spaces of the context move to the continuation;
  ``whole = encode(context + continuation)``, ``context = encode(context)``, continuation tokens
  ``= whole[len(context):]``; no special tokens in the text, but the BOS the tokenizer adds (if any,
  ``calib.framing``) in front of the context, as the model reads its inputs in use; a sequence
  longer than ``max_length + 1`` tokens loses tokens on the left;
- ``acc``: the choice with the highest summed log-likelihood of its continuation tokens;
- ``acc_norm``: the same sum divided by ``len(choice)``: lm-eval's ``completion_len`` is the length
  of the choice *string* (its docs say "byte length"; for the 32 PIQA validation items with
  non-ASCII text characters and bytes differ, and we follow lm-eval's code);
- ``*_stderr``: sample standard deviation / sqrt(n), as lm-eval's ``mean_stderr``.

Requests are sorted by length and batched with right padding: causal attention means the padding
after a sequence never changes its logits, so the in-memory and the streamed model
(``reconstruct.evaluation.streaming``) both serve them. Tasks other than PIQA go to lm-evaluation-harness
when it is installed (it needs the hub for its data); it is never required.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from calib.framing import SequenceFraming, resolve_framing

logger = logging.getLogger(__name__)

BUILTIN_TASKS = ("piqa",)
PIQA_FILES = ("valid.jsonl", "valid-labels.lst")
DEFAULT_MAX_LENGTH = 2048  # lm-eval's HFLM fallback when the config names no context length
MAX_LENGTH_ATTRIBUTES = ("n_positions", "max_position_embeddings", "n_ctx")  # HFLM's look-up order
PAD_ID = 0  # right padding: never attended to by the real tokens before it


@dataclass(frozen=True)
class MultipleChoiceDoc:
    """One question: the context, its choices and the index of the right one."""

    context: str
    choices: tuple[str, ...]
    label: int


def piqa_folder(task_data: Path | None) -> Path:
    """The folder holding PIQA's ``valid.jsonl`` and ``valid-labels.lst``: ``task_data`` or ``task_data/piqa``."""
    if task_data is None:
        raise ValueError(
            "--tasks piqa needs --task-data DIR: a folder with piqa/valid.jsonl and piqa/valid-labels.lst "
            "(the Hugging Face hub is not used for the built-in PIQA)"
        )
    task_data = Path(task_data).expanduser()
    for folder in (task_data / "piqa", task_data):
        if all((folder / name).is_file() for name in PIQA_FILES):
            return folder
    raise ValueError(f"--task-data {task_data}: no {' and '.join(PIQA_FILES)} there or in {task_data / 'piqa'}")


def load_piqa(task_data: Path | None, limit: int | None = None) -> list[MultipleChoiceDoc]:
    """PIQA validation questions (the first ``limit`` if given) in lm-eval's prompt format."""
    folder = piqa_folder(task_data)
    rows = [json.loads(line) for line in (folder / PIQA_FILES[0]).read_text(encoding="utf-8").splitlines() if line.strip()]
    labels = [int(line) for line in (folder / PIQA_FILES[1]).read_text().split()]
    if len(rows) != len(labels):
        raise ValueError(f"--task-data {folder}: {len(rows)} questions but {len(labels)} labels")
    docs = [
        MultipleChoiceDoc(f"Question: {row['goal']}\nAnswer:", (row["sol1"], row["sol2"]), label)
        for row, label in zip(rows, labels)
    ]
    return docs[:limit] if limit is not None else docs


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split as lm-eval's ``TemplateLM._encode_pair`` does."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return context_ids, whole[len(context_ids):]


def max_length_of(config, tokenizer) -> int:
    """The longest input lm-eval's HFLM would feed this model."""
    for attribute in MAX_LENGTH_ATTRIBUTES:
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    model_max = getattr(tokenizer, "model_max_length", None)
    return model_max if isinstance(model_max, int) and 0 < model_max < 1_000_000 else DEFAULT_MAX_LENGTH


@dataclass
class _Request:
    doc: int
    choice: int
    inputs: list[int]  # all tokens but the last, left-truncated to max_length
    continuation: list[int]


@torch.no_grad()
def continuation_loglikelihoods(lm, requests: list[_Request], batch_size: int) -> list[float]:
    """Summed log-probability of each request's continuation tokens given what precedes them."""
    order = sorted(range(len(requests)), key=lambda i: (-len(requests[i].inputs), i))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    token_sets = []
    for batch in batches:
        width = max(len(requests[i].inputs) for i in batch)
        tokens = torch.full((len(batch), width), PAD_ID, dtype=torch.long)  # (b, T), right-padded
        for row, i in enumerate(batch):
            tokens[row, : len(requests[i].inputs)] = torch.tensor(requests[i].inputs)
        token_sets.append(tokens)
    scores = [0.0] * len(requests)
    for set_index, rows, logits in lm.logits(token_sets, batch_size, desc="zero-shot"):
        for row in range(rows.start, rows.stop):
            request = requests[batches[set_index][row]]
            length, n_cont = len(request.inputs), len(request.continuation)
            log_probs = torch.log_softmax(logits[row - rows.start, length - n_cont : length].float(), dim=-1)  # (c, V)
            targets = torch.tensor(request.continuation, device=log_probs.device)
            scores[batches[set_index][row]] = float(log_probs.gather(1, targets[:, None]).sum())
    return scores


def score_multiple_choice(lm, tokenizer, docs: list[MultipleChoiceDoc], batch_size: int = 1,
                          max_length: int = DEFAULT_MAX_LENGTH, *,
                          framing: SequenceFraming | None = None) -> tuple[dict, list[dict]]:
    """lm-eval's ``acc`` and ``acc_norm`` over ``docs``.

    Args:
        lm: an ``InMemoryLM`` or ``StreamedLM``.
        tokenizer: the model's tokenizer.
        docs: the questions.
        batch_size: sequences per forward.
        max_length: longest model input; longer sequences lose tokens on the left.
        framing: what precedes each context (default: nothing; with a BOS, the BOS).

    Returns:
        ``(metrics, items)``: metrics ``{"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}``
        and, per question, ``{"loglikelihoods", "pred", "pred_norm", "label"}``.
    """
    if not docs:
        raise ValueError("no questions to score (--limit 0?)")
    prefix = (framing or SequenceFraming()).prefix()  # [] or [bos_id]
    requests = []
    for doc_index, doc in enumerate(docs):
        for choice_index, choice in enumerate(doc.choices):
            context_ids, continuation_ids = encode_pair(tokenizer, doc.context, " " + choice)
            tokens = (prefix + context_ids + continuation_ids)[-(max_length + 1):]
            requests.append(_Request(doc_index, choice_index, tokens[:-1], continuation_ids))
    scores = continuation_loglikelihoods(lm, requests, batch_size)
    per_doc: list[list[float]] = [[0.0] * len(doc.choices) for doc in docs]
    for request, score in zip(requests, scores):
        per_doc[request.doc][request.choice] = score
    items, correct, correct_norm = [], [], []
    for doc, lls in zip(docs, per_doc):
        pred = max(range(len(lls)), key=lambda i: (lls[i], -i))  # numpy argmax: first of equal maxima
        normed = [ll / len(choice) for ll, choice in zip(lls, doc.choices)]
        pred_norm = max(range(len(normed)), key=lambda i: (normed[i], -i))
        items.append({"loglikelihoods": lls, "pred": pred, "pred_norm": pred_norm, "label": doc.label})
        correct.append(float(pred == doc.label))
        correct_norm.append(float(pred_norm == doc.label))
    metrics = {
        "acc": _mean(correct), "acc_stderr": _mean_stderr(correct),
        "acc_norm": _mean(correct_norm), "acc_norm_stderr": _mean_stderr(correct_norm),
        "n": len(docs),
    }
    return metrics, items


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _mean_stderr(values: list[float]) -> float:
    if len(values) < 2:
        return float("nan")
    mean = _mean(values)
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return math.sqrt(variance / len(values))


def evaluate_tasks(
    model: str,
    tasks: list[str],
    task_data: Path | None = None,
    limit: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 1,
    stream: bool | None = None,
    bos: str = "auto",
) -> dict[str, dict]:
    """Zero-shot metrics per task: PIQA built in (from ``task_data``), others via lm-eval if installed.

    Args:
        model: folder, .gguf, alias or hub id.
        tasks: task names, e.g. ``["piqa"]``.
        task_data: folder with ``piqa/valid.jsonl`` and ``piqa/valid-labels.lst`` (or that folder itself).
        limit: score only the first questions of each task.
        batch_size: sequences per forward.
        stream: run the model one block at a time (None: when it does not fit in memory).
        bos: ``--calib-bos`` for the built-in tasks: ``auto`` (the BOS before each context when the
            tokenizer adds one), ``always`` or ``never``.

    Returns:
        ``{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "seconds", ...}}``.
    """
    from transformers import AutoTokenizer

    from reconstruct.modelio.architecture import load_config
    from reconstruct.modelio.source import resolve_model
    from reconstruct.runtime import model_dtype, resolve_device
    from reconstruct.evaluation.streaming import open_lm

    builtin = [task for task in tasks if task in BUILTIN_TASKS and (task_data is not None or not _has_lm_eval())]
    external = [task for task in tasks if task not in builtin]
    folder = resolve_model(model)
    torch_device = resolve_device(device)
    torch_dtype = model_dtype(dtype, torch_device, load_config(folder))
    results: dict[str, dict] = {}
    if builtin:
        docs = load_piqa(task_data, limit)  # the one built-in task
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        framing = resolve_framing(tokenizer, bos)
        lm = open_lm(folder, torch_device, torch_dtype, stream)
        metrics, _ = score_multiple_choice(lm, tokenizer, docs, batch_size, max_length_of(lm.config, tokenizer),
                                           framing=framing)
        results["piqa"] = {**metrics, "seconds": time.perf_counter() - started, "streamed": lm.streamed,
                           **framing.record()}
        logger.info("piqa: acc %.4f, acc_norm %.4f on %d questions", metrics["acc"], metrics["acc_norm"], metrics["n"])
    if external:
        results.update(run_lm_eval(folder, external, torch_device, torch_dtype, batch_size, limit))
    return results


def _has_lm_eval() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def run_lm_eval(folder: Path, tasks: list[str], device: torch.device, dtype: torch.dtype, batch_size: int,
                limit: int | None) -> dict[str, dict]:
    """Tasks through lm-evaluation-harness (optional; it loads the whole model and fetches data from the hub)."""
    try:
        import lm_eval
    except ImportError:
        raise ValueError(
            f"--tasks {','.join(tasks)}: built in is only {', '.join(BUILTIN_TASKS)} (with --task-data DIR); "
            "other tasks need lm-evaluation-harness (`pip install lm-eval`) and access to the Hugging Face hub"
        ) from None
    from reconstruct.runtime import dtype_name

    output = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={folder},dtype={dtype_name(dtype)}", tasks=tasks,
        device=str(device), batch_size=batch_size, limit=limit,
    )
    return {
        task: {key: value for key, value in metrics.items() if isinstance(value, (int, float))}
        for task, metrics in output["results"].items()
    }
