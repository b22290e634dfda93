"""Benchmark: does the block loop hide its disk IO behind the compute (``--overlap``)?

A job moves every block in from the shards and out again, plus the activation checkpoints; with the
overlap on (``reconstruct/loop/overlap.py``) that IO runs while the next or previous block computes.
This script measures how much of it is hidden, on a synthetic LLaMA-style model stored on disk:

1. Write the model (``bench/memory.py``'s synthetic checkpoints: seeded random blocks, one shard each,
   a word-level tokenizer over the calibration text) and fsync its files.
2. Before every measurement, evict the model's files and the output folder from the page cache with
   ``os.posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)`` on each file: no root needed, works for clean
   pages (every file here is fsynced first), so reads come from the disk. Linux only; where the call
   is missing the reads may come from memory and the JSON says ``"evicted": false``.
3. The disk's own bandwidth with the same files (the floor): read every block shard once, then write
   the same bytes to a new file and fsync it.
4. Run ``reconstruct run`` (Wanda 50%) with ``--method none`` and ``--method masklora``, each with the
   overlap on and off. From each run's ``reconstruct.json``: the seconds spent computing, reading,
   writing (shards and checkpoints) and waiting for them; the block loop's wall time is
   compute + read waits + write waits.
5. Compare, per method: the overlap run's loop time against max(IO alone, compute alone) and against
   their sum, where compute alone and IO alone are the serial run's (``--no-overlap``) totals.

Timing needs an otherwise idle machine: other processes reading or computing change both sides.
Where the IO is a few percent of the time (``masklora`` on a CPU), run-to-run noise is as large as
what the overlap can save: ``--repeats N`` runs each pair N times (alternating which goes first) and
compares medians.

Usage::

    python bench/io.py                                       # hidden 2048, 8 blocks, float32
    python bench/io.py --hidden 256 --intermediate 688 --depth 3 --n-samples 4 --seq-len 32   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory as synthetic  # noqa: E402 (bench/memory.py: the synthetic checkpoints and the run helper)

CHUNK = 16 << 20  # bytes per read/write call of the bandwidth floor


def evict(paths: list[Path]) -> bool:
    """Drop every file under ``paths`` (symlinks resolved) from the page cache; False where the OS cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in files:
            fd = os.open(path.resolve(), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return True


def fsync_files(folder: Path) -> None:
    """fsync every file of ``folder`` (symlinks resolved), so that eviction can drop their pages."""
    for path in folder.iterdir():
        if path.is_file():
            fd = os.open(path.resolve(), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def block_files(model: Path) -> list[Path]:
    """The model's block shards (resolved), in order."""
    return sorted(p.resolve() for p in model.glob("block-*.safetensors"))


def disk_floor(files: list[Path], scratch: Path) -> dict:
    """Read ``files`` from disk (evicted first), then write as many bytes to ``scratch`` and fsync it."""
    evict(files)
    started, total = time.perf_counter(), 0
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            while chunk := handle.read(CHUNK):
                total += len(chunk)
    read_s = time.perf_counter() - started
    payload = os.urandom(CHUNK)
    started, written = time.perf_counter(), 0
    with open(scratch, "wb", buffering=0) as handle:
        while written < total:
            written += handle.write(payload[: min(CHUNK, total - written)])
        os.fsync(handle.fileno())
    write_s = time.perf_counter() - started
    scratch.unlink()
    return {"bytes": total, "read_s": round(read_s, 3), "write_s": round(write_s, 3),
            "read_mb_s": round(total / 2**20 / read_s, 1), "write_mb_s": round(total / 2**20 / write_s, 1)}


def run_once(model: Path, out: Path, method: str, overlap: bool, args, log: Path) -> dict:
    """One ``reconstruct run`` from a cold page cache; its wall time and its ``io`` totals."""
    shutil.rmtree(out, ignore_errors=True)
    evict([model])
    command = synthetic.run_command(model, out, method, args) + ["--overlap" if overlap else "--no-overlap"]
    row = {"method": method, "overlap": overlap, **synthetic.measure(command, log)}
    if row["rc"] != 0:
        row["log_tail"] = log.read_text(errors="replace")[-2000:]
        return row
    report = json.loads((out / "reconstruct.json").read_text())
    io = report["io"]
    row["reported_peak_rss_mb"] = round(report["peak_rss_mb"], 1)
    if report.get("peak_gpu_mb") is not None:
        row["peak_gpu_mb"] = round(report["peak_gpu_mb"], 1)
    row["io"] = {key: round(value, 3) if isinstance(value, float) else value for key, value in io.items()}
    row["loop_s"] = round(io["compute_seconds"] + io["read_wait_seconds"] + io["write_wait_seconds"], 3)
    row["io_alone_s"] = round(io["read_seconds"] + io["write_seconds"] + io["checkpoint_seconds"], 3)
    shutil.rmtree(out, ignore_errors=True)
    return row


def compare(rows: list[dict]) -> dict:
    """Per method: the overlap runs' loop time against max(IO, compute) and their sum, both from the serial runs.

    With repeats, each figure is the median over its runs (compute alone, IO alone and the serial loop
    over the serial runs; the overlap loop over the overlap runs), so one slow run does not decide.
    """
    result = {}
    for method in sorted({row["method"] for row in rows}):
        done = [row for row in rows if row["method"] == method and row["rc"] == 0]
        serial = [row for row in done if not row["overlap"]]
        overlapped = [row for row in done if row["overlap"]]
        if not serial or not overlapped:
            continue
        compute = statistics.median([row["io"]["compute_seconds"] for row in serial])
        io = statistics.median([row["io_alone_s"] for row in serial])
        overlap_loop = statistics.median([row["loop_s"] for row in overlapped])
        bound, total = max(compute, io), compute + io
        result[method] = {
            "runs_each": min(len(serial), len(overlapped)),
            "compute_alone_s": round(compute, 3), "io_alone_s": round(io, 3),
            "serial_loop_s": round(statistics.median([row["loop_s"] for row in serial]), 3),
            "overlap_loop_s": round(overlap_loop, 3),
            "overlap_loop_runs_s": [row["loop_s"] for row in overlapped],
            "serial_loop_runs_s": [row["loop_s"] for row in serial],
            "overlap_over_max": round(overlap_loop / bound, 3) if bound else None,  # target <= 1.15
            "overlap_over_sum": round(overlap_loop / total, 3) if total else None,  # target < 1
            "wall_overlap_s": round(statistics.median([row["wall_s"] for row in overlapped]), 2),
            "wall_serial_s": round(statistics.median([row["wall_s"] for row in serial]), 2),
        }
    return result


def parse_args(argv: list[str] | None):
    """The command line (sizes as in bench/memory.py, one depth)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=8, help="blocks")
    parser.add_argument("--hidden", type=int, default=synthetic.Shape.hidden, help="residual width")
    parser.add_argument("--intermediate", type=int, default=synthetic.Shape.intermediate, help="MLP width")
    parser.add_argument("--heads", type=int, default=synthetic.Shape.heads, help="attention heads")
    parser.add_argument("--dtype", default=synthetic.Shape.dtype, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--calib", type=Path, default=synthetic.DEFAULT_CALIB, help="calibration text file")
    parser.add_argument("--n-samples", type=int, default=4, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--micro-batch", type=int, default=4, help="samples per block forward")
    parser.add_argument("--recon-steps", type=int, default=4, help="masklora optimizer steps per block")
    parser.add_argument("--methods", nargs="+", default=["none", "masklora"], help="--method values to run")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--offload", default="cpu", help="where the activation streams live (auto, device, cpu, disk)")
    parser.add_argument("--work", type=Path, default=None, help="folder on the disk to measure (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each (method, overlap); serial and overlap alternate, medians are compared")
    args = parser.parse_args(argv)
    if not args.calib.is_file():
        parser.error(f"--calib {args.calib}: no such file")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    synthetic.SHAPE = synthetic.Shape(args.hidden, args.intermediate, args.heads, args.dtype)
    with synthetic.work_folder(args.work, args.keep, "bench-io-") as work:
        model = synthetic.write_model(work, args.depth, args.calib, args.seed)
        fsync_files(model)
        evicted = evict([model])
        floor = disk_floor(block_files(model), work / "floor.bin")
        rows = []
        for method in args.methods:
            for repeat in range(args.repeats):
                for overlap in (False, True) if repeat % 2 == 0 else (True, False):  # neither always goes first
                    row = run_once(model, work / "out", method, overlap, args, work / f"run-{method}-{overlap}.log")
                    rows.append({**row, "repeat": repeat})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        summary = {
            "bench": "io-overlap",
            "model": {"family": "llama", "depth": args.depth, "hidden": args.hidden, "intermediate": args.intermediate,
                      "dtype": args.dtype, "block_mb": round(floor["bytes"] / args.depth / 2**20, 1)},
            "calibration": {"n_samples": args.n_samples, "seq_len": args.seq_len}, "repeats": args.repeats,
            "device": args.device, "offload": args.offload, "evicted": evicted,
            "disk_floor": floor, "rows": rows, "comparison": compare(rows),
        }
        print(json.dumps(summary, indent=2))
        return summary


if __name__ == "__main__":
    main()
