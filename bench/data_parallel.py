"""Benchmark: statistics and reconstruction time with 1 vs 2 data-parallel processes on the CPU.

Builds a small random LLaMA (hidden 512, intermediate 1376, 8 heads, 2 blocks; about 3.2M
parameters per block) with a word-level tokenizer over the calibration text, then runs the same job
(by default SparseGPT 50%, MaskLoRA rank 16, 8 steps of 8 samples, 32 x 128 calibration tokens)
three ways, each in a fresh child process:

- 1 process, 1 thread;
- 1 process, 2 threads (the fair single-process baseline for 2 cores);
- 2 processes x 1 thread (gloo, ``torch.multiprocessing``), calibration samples split 16 + 16.

Per run it records seconds spent, summed over blocks, in the engine's phases: statistics
(forward over the pruned stream with hooks + all-reduce), pruning (SparseGPT solve, repeated on every
rank), reconstruction (training + merge, gradients all-reduced) and the whole block loop; plus, against
the first run, the share of block weights whose keep/prune decision differs and the largest weight
difference. Prints one JSON object.

Usage::

    OMP_NUM_THREADS=1 python bench/data_parallel.py [--work ../bench-dp] [--n-samples 32 --seq-len 128]
    OMP_NUM_THREADS=1 python bench/data_parallel.py --pruner wanda --method none --configs 1x1 2x1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CALIB = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
CONFIGS = ("1x1", "1x2", "2x1")  # processes x threads per process


def build_model(folder: Path, calib: Path) -> Path:
    """Write the random small LLaMA and its tokenizer to ``folder`` (once)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_word_tokenizer

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=512, max_position_embeddings=512)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    build_word_tokenizer(calib, 512).save_pretrained(folder)
    return folder


def timed_run(job) -> dict:
    """``run_job(job)`` with the seconds of each engine phase summed over blocks."""
    from unittest import mock

    from reconstruct.jobs import run_job as engine
    from reconstruct.loop import pruning as block_pipeline

    seconds: dict[str, float] = defaultdict(float)

    def timing(phase, function):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[phase] += time.perf_counter() - started

        return wrapper

    pipeline = engine.BlockPipeline
    with mock.patch.object(pipeline, "_collect_statistics", timing("statistics", pipeline._collect_statistics)), \
            mock.patch.object(block_pipeline, "prune_layer", timing("prune", block_pipeline.prune_layer)), \
            mock.patch.object(pipeline, "_reconstruct", timing("reconstruction", pipeline._reconstruct)), \
            mock.patch.object(pipeline, "process", timing("blocks", pipeline.process)):
        engine.run_job(job)
    return dict(seconds)


def make_job(model: Path, out: Path, calib: Path, n_samples: int, seq_len: int, pruner: str, method: str):
    from pruners.pattern import SparsityPattern
    from reconstruct.config import CalibSpec, JobConfig, PruneSpec
    from reconstruct.methods import ReconSpec

    return JobConfig(
        model=str(model), out=out, device="cpu", micro_batch=8, offload="cpu",
        prune=PruneSpec(pruner=pruner, pattern=SparsityPattern.parse("unstructured", 0.5, "row")),
        calib=CalibSpec(source=str(calib), n_samples=n_samples, seq_len=seq_len, seed=0),
        recon=ReconSpec(method=method, rank=16, steps=8, batch_size=8, micro_batch=4, lr=1e-3),
    )


def _rank(rank: int, world: int, port: int, args: dict, result: Path) -> None:
    import torch

    torch.set_num_threads(args["threads"])
    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world, timeout=datetime.timedelta(minutes=30))
    job = make_job(Path(args["model"]), Path(args["out"]), Path(args["calib"]), args["n_samples"], args["seq_len"],
                   args["pruner"], args["method"])
    started = time.perf_counter()
    seconds = timed_run(job)
    seconds["job"] = time.perf_counter() - started
    if rank == 0:
        result.write_text(json.dumps(seconds))
    if world > 1:
        torch.distributed.destroy_process_group()


def child(args: dict) -> None:
    """One configuration, in this (fresh) process."""
    import torch.multiprocessing

    result = Path(args["out"] + ".json")
    if args["nproc"] == 1:
        _rank(0, 1, 0, args, result)
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        torch.multiprocessing.spawn(_rank, args=(args["nproc"], port, args, result), nprocs=args["nproc"])


def compare_outputs(a: Path, b: Path) -> dict:
    """Share of block matrix weights pruned in one output but kept in the other; largest weight difference."""
    from safetensors.torch import load_file

    worst, flipped, total = 0.0, 0, 0
    for path in sorted(a.glob("model-*.safetensors")):
        x, y = load_file(path), load_file(b / path.name)
        for key in x:
            worst = max(worst, (x[key].float() - y[key].float()).abs().max().item())
            if ".layers." in key and x[key].dim() == 2:
                flipped += int(((x[key] == 0) != (y[key] == 0)).sum())
                total += x[key].numel()
    return {"mask_disagreement_vs_first": flipped / max(total, 1), "max_weight_diff_vs_first": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--calib", type=Path, default=DEFAULT_CALIB)
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--pruner", default="sparsegpt")
    parser.add_argument("--method", default="masklora")
    parser.add_argument("--configs", nargs="+", default=CONFIGS, help="PROCESSESxTHREADS, e.g. 1x1 2x1")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        child(json.loads(options.child))
        return
    work = options.work or Path(tempfile.mkdtemp(prefix="bench-dp-"))
    model = build_model(work / "model", options.calib)
    rows, first_out = [], None
    for config in options.configs:
        nproc, threads = (int(part) for part in config.split("x"))
        out = work / f"out-{options.pruner}-{options.method}-{config}"
        args = dict(model=str(model), out=str(out), calib=str(options.calib), n_samples=options.n_samples,
                    seq_len=options.seq_len, nproc=nproc, threads=threads, pruner=options.pruner,
                    method=options.method)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
        subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], check=True, env=env, cwd=REPO)
        seconds = json.loads(Path(str(out) + ".json").read_text())
        first_out = first_out or out
        rows.append({"processes": nproc, "threads": threads, **{k: round(v, 2) for k, v in seconds.items()},
                     **compare_outputs(out, first_out)})
    print(json.dumps({"model": "llama h512 i1376 x2 blocks", "tokens": [options.n_samples, options.seq_len],
                      "pruner": options.pruner, "method": options.method,
                      "load_average": os.getloadavg(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
