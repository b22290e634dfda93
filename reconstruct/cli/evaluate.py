"""``reconstruct eval``: perplexity and zero-shot tasks of a model folder (prints JSON)."""

from __future__ import annotations

import json

import typer

from reconstruct.cli.main import app, setup_logging
from reconstruct.cli.errors import guarded
from reconstruct.cli.options import VERBOSE, command, own_option, spec_options, values
from reconstruct.config import CalibSpec, EvalSpec, JobConfig
from reconstruct.evaluation.perplexity import perplexity
from reconstruct.evaluation.tasks import TaskEvalSpec, evaluate_tasks, parse_task_names
from reconstruct.flags import Flag

# eval's own flags: the evaluation functions' arguments (perplexity, evaluate_tasks), no job spec.
DATA = own_option(Flag("--data", "Perplexity test text: a .txt/.jsonl file or wikitext2, c4, ptb.",
                       show_default="wikitext2 when no --tasks"), str, None)
TASKS = own_option(Flag("--tasks", "Zero-shot tasks, comma-separated: any task, group or tag of lm-evaluation-harness "
                        "(piqa, arc_easy, hellaswag, ...), run on the model in memory or streamed (--stream); needs the "
                        "eval extra (pip install -e \".[eval]\"). Log-likelihood tasks only: generative "
                        "(generate_until) tasks are refused.", show_default="none"), str, None)
BATCH_SIZE = own_option(Flag("--batch-size", "Samples per forward pass: perplexity windows or task sequences (memory "
                             "grows with it).", min=1), int, 1)
STREAM = own_option(Flag("--stream", "Run the model one block at a time.",
                         show_default="only when it does not fit in memory"), bool, None)
EVAL = (*spec_options(JobConfig, "model"), DATA, TASKS, *spec_options(TaskEvalSpec, "task_data"),
        *spec_options(EvalSpec, "max_windows", "seq_len"), BATCH_SIZE, *spec_options(CalibSpec, "bos"), STREAM,
        *spec_options(JobConfig, "device", "dtype"), VERBOSE)


@command(app, "eval", EVAL)
def evaluate(params: dict) -> None:
    """Perplexity on non-overlapping windows of a test text, and zero-shot task accuracy (prints JSON)."""
    setup_logging(params["verbose"])
    model, machine = values(JobConfig, params, EVAL)["model"], values(JobConfig, params, EVAL)
    windows = values(EvalSpec, params, EVAL)

    def evaluate_model():

        task_names = parse_task_names(params["tasks"])
        common = dict(device=machine["device"], dtype=machine["dtype"], batch_size=params["batch_size"],
                      stream=params["stream"], bos=values(CalibSpec, params, EVAL)["bos"])
        result: dict = {}
        if params["data"] is not None or not task_names:
            result = perplexity(model, params["data"] or "wikitext2", seq_len=windows.get("seq_len"),
                                max_windows=windows.get("max_windows"), **common)
        if task_names:
            task_data = values(TaskEvalSpec, params, EVAL).get("task_data")
            result["tasks"] = evaluate_tasks(model, task_names, task_data, windows.get("max_windows"), **common)
        typer.echo(json.dumps(result))

    guarded(evaluate_model)
