"""Benchmark: seconds per retraining step, ours beside a plain transformers step training the same parameters.

Model-level retraining (``reconstruct retrain``'s trainer) on a pruned SmolLM2-135M (every block linear
pruned 50% by magnitude; cached under ``--work``), windows of WikiText-2, against:

- ``bias-ln``: a plain transformers step (forward with ``labels``, backward, clip at 1, AdamW) with the
  blocks' norms trainable (ours also trains a zero-initialised bias on every linear);
- ``masklora``: the plain step with *every block tensor* trainable (full fine-tuning of the blocks), and
  peft's LoRA of the same rank when peft is importable;
- both: ours streamed (``--stream always``) against ours resident.

The runners of a method are held at once and take turns step by step (the order rotating), so load from
other processes spreads over all of them; each reports the median of its timed steps. Then the
layer-wise stage's per-block step (``train_reconstruction``) against a plain torch loop training the same
parameters on the same tensors, alternating runs of ``--steps`` steps. Prints one JSON object; ratios are
ours over the reference (targets: resident ≤ 1.2 × plain, streamed ≤ 1.6 × resident, layer-wise ≤ 1.2 ×).
The first step's losses of every runner are printed too (same windows, same initial parameters).

    python bench/retrain_speed.py --threads 2 --steps 4               # the table of issue 35 (a few minutes)
    python bench/retrain_speed.py --only masklora --profile           # and ours' step by phase
    python bench/retrain_speed.py --device cuda --dtype bfloat16 --seq-len 1024 --batch 8 --micro-batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's package, also when another copy is installed
sys.path.insert(1, str(Path(__file__).resolve().parent))

DEFAULT_DATA = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
COMPARISONS = ("bias-ln", "masklora", "layerwise")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="the dense model (pruned here by magnitude)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="training text")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "retrain-speed", help="pruned copy, scratch")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps of every runner")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=2, help="windows per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=1, help="windows per forward/backward")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--only", nargs="+", choices=COMPARISONS, default=list(COMPARISONS))
    parser.add_argument("--no-streamed", action="store_true", help="skip ours streamed")
    parser.add_argument("--recon-batch", type=int, default=2, help="layer-wise: samples per step")
    parser.add_argument("--recon-samples", type=int, default=8, help="layer-wise: windows captured")
    parser.add_argument("--recon-steps", type=int, default=8, help="layer-wise: steps per timed run")
    parser.add_argument("--recon-runs", type=int, default=3, help="layer-wise: timed runs of each side")
    parser.add_argument("--profile", action="store_true", help="ours' resident (and streamed) step by phase")
    return parser.parse_args(argv)


def sync(device: str):
    import torch

    return (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)


def take_turns(runners: dict, batches: list, warmup: int, wait) -> dict:
    """Every runner steps through ``batches`` in turn (order rotating); median seconds of the timed steps."""
    seconds = {name: [] for name in runners}
    cpu = {name: [] for name in runners}
    first_loss: dict[str, float] = {}
    names = list(runners)
    for index, tokens in enumerate(batches):
        order = names[index % len(names):] + names[: index % len(names)]
        for name in order:
            wait()
            started, cpu_started = time.perf_counter(), time.process_time()
            loss = runners[name].step(index, tokens)
            wait()
            if index >= warmup:
                seconds[name].append(time.perf_counter() - started)
                cpu[name].append(time.process_time() - cpu_started)
            first_loss.setdefault(name, loss)
    return {name: {"s_per_step": round(statistics.median(values), 4),
                   "cpu_s_per_step": round(statistics.median(cpu[name]), 4), "first_loss": first_loss[name],
                   "trainable": runners[name].trainable_count()} for name, values in seconds.items()}


def runner_factories(method: str, folder: Path, args) -> dict:
    import retrain_sides as sides

    scratch = args.work / "scratch"
    factories = {"ours resident": lambda: sides.Ours(folder, method, stream=False, args=args, scratch=scratch)}
    if not args.no_streamed:
        factories["ours streamed"] = lambda: sides.Ours(folder, method, stream=True, args=args, scratch=scratch)
    if method == "bias-ln":
        factories["plain, norms trainable"] = lambda: sides.Plain(folder, "norms", args=args)
    else:
        factories["plain, every block tensor trainable"] = lambda: sides.Plain(folder, "blocks", args=args)
        if sides.peft_available():
            factories[f"peft LoRA r{args.rank}"] = lambda: sides.PeftLora(folder, args=args)
    return factories


def compare_retraining(method: str, folder: Path, batches: list, args) -> dict:
    runners = {name: make() for name, make in runner_factories(method, folder, args).items()}
    try:
        rows = take_turns(runners, batches, args.warmup, sync(args.device))
    finally:
        for runner in runners.values():
            runner.close()
    return {"runners": rows, "ratios": ratios(rows, "s_per_step"), "cpu_ratios": ratios(rows, "cpu_s_per_step")}


def ratios(rows: dict, key: str) -> dict:
    """Ours resident over every reference, and ours streamed over ours resident, by ``key``."""
    ours = rows["ours resident"][key]
    result = {f"ours resident / {name}": round(ours / row[key], 3)
              for name, row in rows.items() if not name.startswith("ours")}
    if "ours streamed" in rows:
        result["ours streamed / ours resident"] = round(rows["ours streamed"][key] / ours, 3)
    return result


def profile_step(method: str, folder: Path, batches: list, args, stream: bool) -> dict:
    import retrain_sides as sides
    from step_phases import PhaseClock

    clock = PhaseClock(sync(args.device))
    with clock.install():
        runner = sides.Ours(folder, method, stream=stream, args=args, scratch=args.work / "scratch")
        try:
            for index, tokens in enumerate(batches[: args.warmup]):
                runner.step(index, tokens)
            clock.totals.clear()
            started = time.perf_counter()
            for index, tokens in enumerate(batches[args.warmup:], start=args.warmup):
                runner.step(index, tokens)
            wall = time.perf_counter() - started
        finally:
            runner.close()
    steps = len(batches) - args.warmup
    return {"s_per_step": round(wall / steps, 4), "phases": clock.per_step(steps, wall)}


def compare_layerwise(folder: Path, dense: Path, tokens, args) -> dict:
    import layerwise_sides as layerwise

    case = layerwise.block_case(folder, dense, tokens, args)
    rows = {}
    for method in ("bias-ln", "masklora"):
        times = {"ours": [], "plain loop": []}
        losses = {}
        for run in range(args.recon_runs + 1):  # the first run of each side warms up
            for side, function in (("ours", layerwise.ours), ("plain loop", layerwise.plain))[:: 1 if run % 2 else -1]:
                seconds, cpu, loss = function(case, method, args.recon_steps, args)
                if run:
                    times[side].append((seconds, cpu))
                losses[side] = loss
        row = {}
        for label, column in (("s_per_step", 0), ("cpu_s_per_step", 1)):
            ours, plain = (statistics.median(t[column] for t in times[side]) for side in ("ours", "plain loop"))
            row[label] = {"ours": round(ours, 4), "plain loop": round(plain, 4), "ratio": round(ours / plain, 3)}
        rows[method] = {**row, "mean_loss": losses}
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from reconstruct.host_allocator import unpool_large_allocations
    from reconstruct.modelio.loaded import load_model
    from reconstruct.modelio.source import resolve_model
    from reconstruct.retrain.data import retrain_windows

    unpool_large_allocations()  # as the command line does before any command
    import retrain_sides as sides

    args.work.mkdir(parents=True, exist_ok=True)
    folder = sides.pruned_model(args.model, args.work, args.sparsity)
    loaded = load_model(str(folder), "cpu", args.dtype)
    n_steps = args.warmup + args.steps
    windows = retrain_windows(loaded, args.data, n_windows=max(n_steps * args.batch, args.recon_samples),
                              seq_len=args.seq_len, seed=0, framing=loaded.framing("auto"))
    batches = [windows[step * args.batch : (step + 1) * args.batch] for step in range(n_steps)]
    report = {"settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
              "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    for method in [m for m in ("bias-ln", "masklora") if m in args.only]:
        report[method] = compare_retraining(method, folder, batches, args)
        if args.profile:
            report[method]["profile resident"] = profile_step(method, folder, batches, args, stream=False)
            if not args.no_streamed:
                report[method]["profile streamed"] = profile_step(method, folder, batches, args, stream=True)
        print(json.dumps({method: report[method]}), file=sys.stderr, flush=True)
    if "layerwise" in args.only:
        report["layerwise"] = compare_layerwise(folder, resolve_model(args.model), windows[: args.recon_samples], args)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
