"""Benchmark: time and peak RSS of a plain prune, ours beside llm-compressor's one-shot, one after the other.

For each pruner (50% unstructured, SmolLM2-135M, fp32, CPU, 16 × 256 tokens of WikiText-2 valid):

1. ``reconstruct run --method none`` in a child process: its wall time and peak RSS (the child's
   ``ru_maxrss`` from ``os.wait4``), and the job's own seconds from ``reconstruct.json`` (from the
   model open to the last file written: no interpreter start or imports).
2. With ``--llmc-python``: ``bench/llmcompressor_baseline.py`` run by that interpreter (a separate
   virtualenv with ``bench/requirements-llmcompressor.txt``): its wall time and peak RSS measured
   the same way, and the seconds of its ``oneshot`` call (model already loaded, calibration
   tokenized) as it reports them.

Run it on an otherwise idle machine: timings taken while other jobs share the cores are not
comparable. Prints one JSON line per run, then a summary JSON object.

    python bench/speed.py --llmc-python .venv-llmc/bin/python
    python bench/speed.py --pruners wanda --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CALIB = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def measure(command: list[str], log: Path) -> dict:
    """Run ``command``; its exit code, wall seconds and peak RSS (MiB) from ``os.wait4``, and its stdout."""
    started = time.perf_counter()
    with open(log, "wb") as err, tempfile.TemporaryFile() as out:
        process = subprocess.Popen(command, stdout=out, stderr=err, cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
        out.seek(0)
        stdout = out.read().decode(errors="replace")
    return {"rc": process.returncode, "wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024), "stdout": stdout}


def ours(pruner: str, args, work: Path) -> dict:
    out = work / f"ours-{pruner}"
    command = [sys.executable, "-m", "reconstruct", "run", "--model", args.model, "--pruner", pruner,
               "--sparsity", "0.5", "--method", "none", "--calib", str(args.calib), "--n-samples", str(args.n_samples),
               "--seq-len", str(args.seq_len), "--device", "cpu", "--dtype", "float32", "--out", str(out), "--force"]
    row = measure(command, work / f"ours-{pruner}.log")
    row.pop("stdout")
    if row["rc"] == 0:
        row["job_s"] = round(json.loads((out / "reconstruct.json").read_text())["elapsed_seconds"], 1)
    return {"side": "reconstruct", "pruner": pruner, **row}


def llmcompressor(pruner: str, args, work: Path, model_dir: Path) -> dict:
    command = [args.llmc_python, str(REPO / "bench" / "llmcompressor_baseline.py"), "--model", str(model_dir),
               "--calib-file", str(args.calib), "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len),
               "--seed", "0", "--method", pruner, "--sparsity", "0.5", "--pattern", "unstructured",
               "--out", str(work / f"llmc-{pruner}")]
    row = measure(command, work / f"llmc-{pruner}.log")
    stdout = row.pop("stdout").strip().splitlines()
    if row["rc"] == 0 and stdout:
        result = json.loads(stdout[-1])
        row["oneshot_s"] = round(result["seconds"], 1)
        row["llmcompressor_version"] = result.get("llmcompressor_version")
    return {"side": "llm-compressor", "pruner": pruner, **row}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model for both sides (alias, folder or .gguf)")
    parser.add_argument("--pruners", default="wanda,sparsegpt")
    parser.add_argument("--calib", type=Path, default=DEFAULT_CALIB)
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side and pruner (alternating)")
    parser.add_argument("--llmc-python", default=None, help="python of a virtualenv with llmcompressor installed")
    parser.add_argument("--work", type=Path, default=None, help="folder for outputs and logs (default: temp)")
    args = parser.parse_args()

    from reconstruct.modelio.source import resolve_model

    model_dir = resolve_model(args.model)  # converted once, before any timing
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for _ in range(args.repeats):
        for pruner in args.pruners.split(","):
            runs = [ours(pruner, args, work)]
            if args.llmc_python:
                runs.append(llmcompressor(pruner, args, work, model_dir))
            for row in runs:
                print(json.dumps(row), flush=True)
            rows += runs
    summary = {"bench": "speed", "load_average": os.getloadavg(), "cpus": os.cpu_count(), "rows": len(rows)}
    for pruner in args.pruners.split(","):
        for side in ("reconstruct", "llm-compressor"):
            done = [r for r in rows if r["pruner"] == pruner and r["side"] == side and r["rc"] == 0]
            if done:
                best = min(done, key=lambda r: r["wall_s"])
                summary[f"{pruner}/{side}"] = {k: v for k, v in best.items() if k not in ("side", "pruner", "rc")}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
