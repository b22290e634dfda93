"""Benchmark: how long one activation-stream checkpoint takes, and what ``--checkpoint-every auto`` does with it.

A checkpoint writes the pruned and the dense stream, each ``(n_samples, seq_len, hidden)`` in the
compute dtype, to one safetensors file through the same atomic writer the engine uses (temp file,
fsync, rename). This times that write for a given shape and prints one JSON object: bytes written,
seconds per checkpoint (each repeat), throughput, and, for ``--block-seconds`` of compute per block,
how many blocks ``auto`` lets pass between checkpoints and the overhead that leaves
(``reconstruct/state/checkpoint_policy.py``).

Usage::

    python bench/checkpoint.py                                   # OPT-30B width, 32 x 2048 tokens, bf16
    python bench/checkpoint.py --n-samples 128 --hidden 7168 --block-seconds 10 --dir /mnt/fast-disk
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from reconstruct.atomic import save_safetensors_atomic
from reconstruct.state.checkpoint_policy import simulate_schedule

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SIMULATED_BLOCKS = 240  # long enough for auto's steady cadence to show


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=7168, help="OPT-30B: 7168; LLaMA-30B: 6656")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--streams", type=int, choices=(1, 2), default=2, help="2 when reconstructing")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--block-seconds", type=float, default=10.0, help="compute per block, for the auto cadence")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()

    shape = (args.n_samples, args.seq_len, args.hidden)
    generator = torch.Generator().manual_seed(0)
    names = ["sparse", "dense"][: args.streams]
    streams = {name: torch.randn(shape, generator=generator).to(DTYPES[args.dtype]) for name in names}
    n_bytes = sum(t.numel() * t.element_size() for t in streams.values())
    seconds = []
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = Path(folder) / "streams-after-00000.safetensors"
        for _ in range(args.repeats):
            started = time.perf_counter()
            save_safetensors_atomic(path, streams)
            seconds.append(time.perf_counter() - started)
    worst = max(seconds)
    taken = simulate_schedule("auto", SIMULATED_BLOCKS, args.block_seconds, worst)  # the engine's own policy
    every = taken[-1] - taken[-2] if len(taken) > 1 else SIMULATED_BLOCKS
    print(json.dumps({
        "shape": list(shape), "dtype": args.dtype, "streams": args.streams, "gigabytes": n_bytes / 1e9,
        "seconds": seconds, "gigabytes_per_second": n_bytes / 1e9 / worst,
        "block_seconds": args.block_seconds, "auto_blocks_between_checkpoints": every,
        "auto_overhead": worst / (every * args.block_seconds),
        "every_block_overhead": worst / args.block_seconds,
    }))


if __name__ == "__main__":
    main()
