"""Benchmark: a zeroed structured-pruning output beside its shrunk model, measured side by side in one run.

For each of the two folders (``DIR`` as written by ``reconstruct run``, ``DIR/shrunk`` or ``--shrunk``):
perplexity with the project's evaluation (``reconstruct.evaluation.perplexity.perplexity``: non-overlapping windows),
parameter count, weight-file bytes, and throughput with plain transformers: prompt processing (one
forward over a ``--prompt-len`` prompt, tokens/s) and generation (``--new-tokens`` greedy tokens with the
KV cache after that prompt, tokens/s). Timings alternate dense/shrunk for ``--repeats`` rounds and
report the median, so both see the same machine state. Run it on an otherwise idle machine: timings
taken while other jobs share the cores are not comparable. Prints one JSON object.

    python bench/shrink.py smollm2-ch35 --data ../shared/data/wikitext-2/test.txt --seq-len 512 --windows 20
    python bench/shrink.py out --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reconstruct.evaluation.perplexity import perplexity  # noqa: E402
from reconstruct.modelio.output import WEIGHT_SUFFIXES  # noqa: E402
from reconstruct.shrink import SHRUNK_DIR, count_parameters  # noqa: E402


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so a timer measures it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def prompt_tokens_per_second(model, prompt: torch.Tensor, device: str) -> float:
    """One forward over ``prompt`` (1, T): tokens per second."""
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        model(prompt, use_cache=False)
    synchronize(device)
    return prompt.shape[1] / (time.perf_counter() - start)


def generation_tokens_per_second(model, prompt: torch.Tensor, new_tokens: int, device: str) -> float:
    """Greedy decoding of ``new_tokens`` after ``prompt`` with the KV cache: generated tokens per second."""
    with torch.no_grad():
        output = model(prompt, use_cache=True)
        past, token = output.past_key_values, output.logits[:, -1:].argmax(-1)  # (1, 1)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            output = model(token, past_key_values=past, use_cache=True)
            past, token = output.past_key_values, output.logits[:, -1:].argmax(-1)
        synchronize(device)
    return new_tokens / (time.perf_counter() - start)


def folder_facts(folder: Path, args) -> dict:
    """Perplexity, parameters and weight bytes of one folder."""
    result = {"folder": str(folder), "parameters": count_parameters(folder),
              "file_bytes": sum(p.stat().st_size for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)}
    if args.data:
        evaluated = perplexity(str(folder), args.data, seq_len=args.seq_len, max_windows=args.windows,
                               device=args.device, dtype=args.dtype)
        result["perplexity"] = evaluated["perplexity"]
    return result


def main() -> None:
    """Measure the zeroed folder and its shrunk version side by side and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dense", type=Path, help="the zeroed folder (a reconstruct run output)")
    parser.add_argument("--shrunk", type=Path, default=None, help=f"the shrunk folder (default DENSE/{SHRUNK_DIR})")
    parser.add_argument("--data", default=None, help="perplexity test text (.txt); omitted: no perplexity")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    folders = {"dense": args.dense, "shrunk": args.shrunk or args.dense / SHRUNK_DIR}
    result = {name: folder_facts(folder, args) for name, folder in folders.items()}

    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    models = {name: AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(args.device).eval()
              for name, folder in folders.items()}
    vocab = models["dense"].config.vocab_size
    prompt = (torch.arange(args.prompt_len) * 7919 % vocab).unsqueeze(0).to(args.device)  # (1, T)
    timings = {name: {"prompt": [], "generation": []} for name in models}
    for name, model in models.items():  # warm-up
        prompt_tokens_per_second(model, prompt, args.device)
    for _ in range(args.repeats):  # alternate, so both see the same machine state
        for name, model in models.items():
            timings[name]["prompt"].append(prompt_tokens_per_second(model, prompt, args.device))
            timings[name]["generation"].append(generation_tokens_per_second(model, prompt, args.new_tokens, args.device))
    for name in models:
        result[name]["prompt_tokens_per_s"] = statistics.median(timings[name]["prompt"])
        result[name]["generation_tokens_per_s"] = statistics.median(timings[name]["generation"])
    result["settings"] = {key: value for key, value in vars(args).items() if key not in ("dense", "shrunk")}
    result["settings"]["threads"] = torch.get_num_threads()
    print(json.dumps(result, default=str, indent=2))


if __name__ == "__main__":
    main()
