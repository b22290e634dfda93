"""Benchmark: peak host memory of ``reconstruct retrain --stream always`` as the model gets deeper.

Model-level retraining streamed one block at a time must hold O(one block + the block-boundary
hidden states), not O(model): peak RSS at 16 blocks should be within 15% of 2 blocks for a wide model.
The synthetic models are those of ``bench/memory.py`` (LLaMA-style, hidden 2048, intermediate 5504,
16 heads, about 200 MB of float32 per block; written block by block, shared between depths). They are
dense, so the runs pass ``--allow-dense`` (the memory of a pruned model is the same: the zeros are
stored). Each depth runs in a subprocess whose peak RSS comes from ``os.wait4``.

Usage::

    python bench/retrain_memory.py                                 # depths 2 16, masklora, 2 steps
    python bench/retrain_memory.py --depths 2 16 --hidden 256 --intermediate 512 --heads 4   # a quick check
    python bench/retrain_memory.py --loss kd                       # distillation: the teacher's streamed
                                                                   # forward and the KL in the head

With ``--loss kd`` (or ``lm+kd``) each model is its own teacher (``--teacher`` = ``--model``: the
synthetic models are dense, and the memory of a teacher forward does not depend on its weights'
values); the teacher's top-k forward streams one block at a time like the training.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory as base  # noqa: E402  (bench/memory.py: the synthetic models and the measurement)
from reconstruct.retrain.spec import LOSSES  # noqa: E402


def retrain_command(model: Path, out: Path, args) -> list[str]:
    """The ``reconstruct retrain`` command line of one row."""
    return [
        sys.executable, "-m", "reconstruct", "retrain", "--model", str(model), "--data", str(args.calib),
        "--out", str(out), "--method", args.method, "--steps", str(args.steps), "--batch", str(args.batch),
        "--micro-batch", str(args.micro_batch), "--seq-len", str(args.seq_len), "--n-windows", str(args.batch),
        "--val", "0", "--stream", "always", "--allow-dense", "--device", args.device, "--dtype", base.SHAPE.dtype,
        *(["--loss", args.loss, "--teacher", str(model), "--kd-top-k", str(args.kd_top_k)] if args.loss != "lm" else []),
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 16], help="blocks per model")
    parser.add_argument("--calib", type=Path, default=base.DEFAULT_CALIB, help="training text file")
    parser.add_argument("--method", default="masklora", help="retraining method")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=4, help="windows per step")
    parser.add_argument("--micro-batch", type=int, default=2, help="windows per forward/backward")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per window")
    parser.add_argument("--work", type=Path, default=None, help="folder for models and outputs (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the models and outputs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--hidden", type=int, default=base.Shape.hidden, help="residual width")
    parser.add_argument("--intermediate", type=int, default=base.Shape.intermediate, help="MLP width")
    parser.add_argument("--heads", type=int, default=base.Shape.heads, help="attention heads")
    parser.add_argument("--dtype", default=base.Shape.dtype, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--loss", default="lm", choices=list(LOSSES), help="retraining loss (kd: self-distillation)")
    parser.add_argument("--kd-top-k", type=int, default=64, help="teacher probabilities kept per token (--loss kd)")
    args = parser.parse_args(argv)
    base.SHAPE = base.Shape(args.hidden, args.intermediate, args.heads, args.dtype)
    if not args.calib.is_file():
        parser.error(f"--calib {args.calib}: no such file")
    with base.work_folder(args.work, args.keep, "bench-retrain-memory-") as work:
        rows = []
        for depth in sorted(set(args.depths)):
            model = base.write_model(work, depth, args.calib, args.seed)
            out = work / f"out-{depth}"
            shutil.rmtree(out, ignore_errors=True)
            log = work / f"retrain-{depth}.log"
            row = {"depth": depth, "method": args.method, "loss": args.loss, **base.measure(retrain_command(model, out, args), log)}
            if row["rc"] != 0:
                row["log_tail"] = log.read_text(errors="replace")[-2000:]
            else:
                report = json.loads((out / "reconstruct.json").read_text())
                row["seconds_per_step"] = round(report["retrain"]["seconds_per_step"], 2)
                row["read_share"] = round(report["retrain"]["read_share"], 3)
                row["streamed"] = report["retrain"]["streamed"]
                if report.get("peak_gpu_mb") is not None:
                    row["peak_gpu_mb"] = round(report["peak_gpu_mb"], 1)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
        done = [row for row in rows if row["rc"] == 0]
        summary = {
            "bench": "retrain-memory-vs-depth",
            "model": {"family": "llama", "hidden": base.SHAPE.hidden, "intermediate": base.SHAPE.intermediate,
                      "heads": base.SHAPE.heads, "dtype": base.SHAPE.dtype,
                      "block_mb": round(base.SHAPE.block_params * base.SHAPE.bytes_per_param / 2**20, 1)},
            "command": " ".join(retrain_command(Path("MODEL"), Path("OUT"), args)[1:]),
            "rows": rows,
        }
        if len(done) >= 2:
            summary[f"ratio_peak{done[-1]['depth']}_peak{done[0]['depth']}"] = round(
                done[-1]["peak_rss_mb"] / done[0]["peak_rss_mb"], 3)
        print(json.dumps(summary, indent=2))
        return summary


if __name__ == "__main__":
    main()
