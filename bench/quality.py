"""Quality benchmark: prune (and reconstruct) a model over a grid of settings, evaluate each.

Each cell runs ``reconstruct run`` and ``reconstruct eval`` in child processes and prints one JSON
line: settings, perplexity, the job's own seconds and peak RSS (from ``reconstruct.json``), the
wall time of the run command, and per-block reconstruction MSE totals. Cells already present in
``--results`` are skipped, so an interrupted grid can be continued.

Example (the tables in docs/benchmarks.md):

    python bench/quality.py --cells wanda:0.5:none,wanda:0.5:bias-ln,sparsegpt:2:4:masklora \\
        --calib ../shared/data/wikitext-2/valid.txt --eval-data ../shared/data/wikitext-2/test.txt

A cell is ``pruner:pattern-or-sparsity:method[+flag=value...]`` where the middle part is a sparsity
(``0.5``), an N:M pattern (``2:4``), or a structured pattern with its fraction (``heads@0.2222``: 2 of
9 heads per block; ``channels@0.2``: 20% of the MLP channels). Each ``+flag=value`` (or bare
``+flag``) adds ``--flag value`` (``--flag``) to that cell's run, and is part of its name, e.g.
``wanda:0.7:masklora+cycles=3`` or ``loraprune:0.5:none+loraprune-steps=40``. Extra ``run`` flags for
every cell go after ``--``. A cell's flags come last, so ``+n-samples=64`` overrides ``--n-samples``.

The reconstruction guard (held-out samples, docs/benchmarks.md) per cell: ``wanda:0.5:masklora`` runs
with it (the default), ``wanda:0.5:masklora+no-recon-guard`` measures the held-out error but keeps every
repair, ``wanda:0.5:masklora+recon-val=0`` trains on every sample as before the guard existed; each row
reports ``blocks_kept`` of ``blocks_guarded``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def parse_cell(cell: str) -> dict:
    """``wanda:0.5:none`` / ``sparsegpt:2:4:masklora`` / ``wanda:heads@0.2222:masklora+cycles=3`` → settings."""
    cell, *flag_parts = cell.split("+")
    flags: list[str] = []
    for part in flag_parts:
        name, has_value, value = part.partition("=")
        flags += [f"--{name}", value] if has_value else [f"--{name}"]
    parts = cell.split(":")
    if len(parts) == 4:
        pruner, n, m, method = parts
        return {"pruner": pruner, "pattern": f"{n}:{m}", "sparsity": None, "method": method, "flags": flags}
    pruner, shape, method = parts
    pattern, _, sparsity = shape.rpartition("@")
    return {"pruner": pruner, "pattern": pattern or "unstructured", "sparsity": float(sparsity), "method": method,
            "flags": flags}


def cell_name(settings: dict) -> str:
    if settings["sparsity"] is None:
        shape = settings["pattern"].replace(":", "of")
    elif settings["pattern"] == "unstructured":
        shape = f"s{settings['sparsity']:g}"
    else:
        shape = f"{settings['pattern']}{settings['sparsity']:g}"
    flags = "".join(f"-{flag.lstrip('-')}" for flag in settings.get("flags", []))
    return f"{settings['pruner']}-{shape}-{settings['method']}{flags}".replace("/", "-")  # a path value: one folder


def run_cell(settings: dict, args, extra: list[str]) -> dict:
    out = Path(args.out_root) / cell_name(settings)
    command = [
        sys.executable, "-m", "reconstruct", "run", "--model", args.model, "--pruner", settings["pruner"],
        "--pattern", settings["pattern"], "--method", settings["method"], "--calib", args.calib,
        "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len), "--device", args.device,
        "--out", str(out), *extra, *settings.get("flags", []),
    ]
    if settings["sparsity"] is not None:
        command += ["--sparsity", str(settings["sparsity"])]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - started
    report = json.loads((out / "reconstruct.json").read_text())
    evaluation = json.loads(
        subprocess.run(
            [sys.executable, "-m", "reconstruct", "eval", "--model", str(out), "--data", args.eval_data,
             "--seq-len", str(args.eval_seq_len), "--max-windows", str(args.eval_windows), "--device", args.device],
            check=True, capture_output=True, text=True,
        ).stdout.strip().splitlines()[-1]
    )
    blocks = report["blocks"]
    return {
        **settings,
        "perplexity": evaluation["perplexity"],
        "mean_linear_sparsity": report["mean_linear_sparsity"],
        "job_seconds": report["elapsed_seconds"],
        "run_wall_seconds": wall,
        "peak_rss_mb": report["peak_rss_mb"],
        "peak_gpu_mb": report.get("peak_gpu_mb"),
        "device": args.device,
        "mse_before_sum": sum(b.get("mse_before") or 0.0 for b in blocks),
        "mse_after_sum": sum(b.get("mse_after") or 0.0 for b in blocks),
        "blocks_kept": sum(1 for b in blocks if b.get("recon_kept")),  # the guard: repairs kept ...
        "blocks_guarded": sum(1 for b in blocks if b.get("recon_kept") is not None),  # ... of blocks it judged
        "trainable_share": sum(b.get("trainable_params", 0) for b in blocks) / max(sum(b.get("block_params", 0) for b in blocks), 1),
        "extra_flags": extra,
        "out": str(out),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", required=True, help="comma-separated pruner:sparsity-or-N:M:method cells")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--eval-data", required=True)
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out-root", default="runs/quality")
    parser.add_argument("--results", default="runs/quality/results.jsonl")
    args, extra = parser.parse_known_args()
    extra = [flag for flag in extra if flag != "--"]
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if results.is_file():
        done = {cell_name(json.loads(line)) for line in results.read_text().splitlines() if line.strip()}
    for cell in args.cells.split(","):
        settings = parse_cell(cell)
        if cell_name(settings) in done:
            continue
        row = run_cell(settings, args, extra)
        print(json.dumps(row), flush=True)
        with results.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
