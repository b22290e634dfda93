"""lm-eval tasks scored three ways, item by item: lm-eval's own HFLM, ``reconstruct eval`` in memory and streamed.

All three run lm-eval's task definitions (``reconstruct.evaluation.tasks.run_lm_eval``, local data
from ``--task-data``) on the same model folder in float32 on the CPU. The script prints, per task,
each way's metrics and seconds as it finishes, then how many items' log-likelihoods differ bit for bit
from the first way's (and the largest difference) and how many items' ``acc`` / ``acc_norm`` differ,
as JSON lines (the summary last).

    python bench/lm_eval_match.py --model smollm2-135m --tasks piqa --task-data ../shared/data --limit 200
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def scored_items(output: dict, task: str) -> dict[int, dict]:
    """``{doc_id: {"lls": [...], "acc": ..., "acc_norm": ...}}`` from ``simple_evaluate``'s samples."""
    items = {}
    for sample in output["samples"][task]:
        lls = [float(response[0]) for response in sample["filtered_resps"]]
        items[sample["doc_id"]] = {"lls": lls, **{key: sample[key] for key in ("acc", "acc_norm") if key in sample}}
    return items


def compare(reference: dict[int, dict], other: dict[int, dict]) -> dict:
    """Items whose log-likelihoods or per-item metrics differ from the reference's."""
    assert reference.keys() == other.keys()
    differ = [doc for doc in reference if reference[doc]["lls"] != other[doc]["lls"]]
    largest = max((abs(a - b) for doc in reference for a, b in zip(reference[doc]["lls"], other[doc]["lls"])), default=0.0)
    return {
        "items": len(reference),
        "lls_not_bit_equal": len(differ),
        "largest_ll_difference": largest,
        "acc_differs": sum(reference[doc].get("acc") != other[doc].get("acc") for doc in reference),
        "acc_norm_differs": sum(reference[doc].get("acc_norm") != other[doc].get("acc_norm") for doc in reference),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="piqa")
    parser.add_argument("--task-data", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--ways", default="hflm,memory,stream", help="which of hflm, memory, stream to run")
    args = parser.parse_args()

    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from calib.framing import resolve_framing
    from reconstruct.evaluation.lm_eval_model import ReconstructLM
    from reconstruct.evaluation.streaming import open_lm
    from reconstruct.evaluation.tasks import metric_table, parse_task_names, run_lm_eval
    from reconstruct.modelio.source import resolve_model

    folder = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    framing = resolve_framing(tokenizer, "auto")
    cpu = torch.device("cpu")
    builders = {
        "hflm": lambda: HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=args.batch_size),
        "memory": lambda: ReconstructLM(open_lm(folder, cpu, torch.float32, False), tokenizer, framing, args.batch_size),
        "stream": lambda: ReconstructLM(open_lm(folder, cpu, torch.float32, True), tokenizer, framing, args.batch_size),
    }
    tasks = parse_task_names(args.tasks)
    report: dict = {"model": args.model, "limit": args.limit, "batch_size": args.batch_size, "ways": {}}
    outputs = {}
    for way in args.ways.split(","):
        started = time.perf_counter()
        outputs[way], _ = run_lm_eval(builders[way], tasks, args.task_data, args.limit, log_samples=True)
        report["ways"][way] = {"seconds": time.perf_counter() - started, "metrics": metric_table(outputs[way])}
        print(json.dumps({way: report["ways"][way]}), flush=True)  # each way as it finishes; the summary last
    reference = next(iter(outputs))
    for way in outputs:
        if way != reference:
            report["ways"][way]["versus_" + reference] = {
                task: compare(scored_items(outputs[reference], task), scored_items(outputs[way], task))
                for task in outputs[way]["samples"]
            }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
