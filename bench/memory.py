"""Benchmark: peak host memory and wall time of ``reconstruct run`` as the model gets deeper.

The design rule is that memory is O(one block + activations), never O(model). This script checks it
on CPU with synthetic LLaMA-style models of fixed width (hidden 2048, intermediate 5504, 16 heads,
about 50M parameters or 200 MB of float32 per block) and growing depth (2, 4, 8, 16 blocks):

1. Write the checkpoints shard by shard, never building the full model in this process: each block
   is built on its own from the config (``LlamaDecoderLayer``), given seeded random weights, saved to
   its own safetensors file and freed. Block ``i`` is the same in every depth, so the block files are
   written once into a pool and each depth's folder links to the first ``depth`` of them, with its own
   ``config.json``, index, embeddings/head shard and a word-level tokenizer over the calibration text.
2. For each depth, run ``reconstruct run`` end to end in a subprocess (wanda, 50%, ``--method none``;
   plus ``--method masklora`` at the smallest and largest depth unless ``--no-masklora``) and measure
   the child's peak RSS with ``os.wait4`` (the kernel's ``ru_maxrss`` of exactly that child) and its
   wall time. A child that only imports the engine gives the interpreter + libraries baseline.
3. Print one JSON object: a row per run, the ratio ``peak(deepest) / peak(shallowest)`` per method
   (target: <= 1.15) and seconds per block (target: roughly constant, i.e. time linear in depth).

Usage::

    python bench/memory.py                      # depths 2 4 8 16, 8 x 128 tokens of WikiText-2 valid
    python bench/memory.py --depths 2 16 --calib my.txt --work ../bench-memory --keep
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CALIB = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"

VOCAB = 8192  # word-level vocabulary built from the calibration text
INIT_STD = 0.02  # std of the random linear/embedding weights


@dataclass(frozen=True)
class Shape:
    """Width of the synthetic blocks and the dtype they are stored in (depth varies per row)."""

    hidden: int = 2048  # residual width
    intermediate: int = 5504  # MLP width
    heads: int = 16  # attention heads (no grouped-query attention)
    dtype: str = "float32"  # stored and computed dtype

    @property
    def block_params(self) -> int:
        return 4 * self.hidden * self.hidden + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def bytes_per_param(self) -> int:
        return 4 if self.dtype == "float32" else 2


SHAPE = Shape()  # set once by main() from the command line


# --------------------------------------------------------------------------- synthetic checkpoints
def llama_config(n_layers: int):
    """The benchmark's LLaMA config at a given depth."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=SHAPE.hidden, intermediate_size=SHAPE.intermediate, num_hidden_layers=n_layers,
        num_attention_heads=SHAPE.heads, num_key_value_heads=SHAPE.heads, vocab_size=VOCAB,
        max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        architectures=["LlamaForCausalLM"], dtype=SHAPE.dtype,
    )


def write_block(pool: Path, index: int, seed: int) -> Path:
    """Build block ``index`` alone on CPU with seeded random weights and save it; returns its file."""
    import torch
    from safetensors.torch import save_file
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    path = pool / f"block-{index:05d}.safetensors"
    if path.is_file():
        return path
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    block = LlamaDecoderLayer(llama_config(index + 1), layer_idx=index)
    tensors = {}
    with torch.no_grad():
        for name, param in block.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, INIT_STD, generator=generator)
            else:  # RMSNorm weights: around 1
                param.fill_(1.0).add_(torch.randn(param.shape, generator=generator) * 0.02)
            tensors[f"model.layers.{index}.{name}"] = param.detach().to(getattr(torch, SHAPE.dtype)).contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    tmp.rename(path)
    del block, tensors
    return path


def write_outside(pool: Path, seed: int) -> Path:
    """Embeddings, final norm and LM head (the same at every depth); returns the file."""
    import torch
    from safetensors.torch import save_file

    path = pool / "outside.safetensors"
    if path.is_file():
        return path
    generator = torch.Generator().manual_seed(seed * 1_000_003 - 1)
    tensors = {
        "model.embed_tokens.weight": torch.randn(VOCAB, SHAPE.hidden, generator=generator) * INIT_STD,
        "model.norm.weight": torch.ones(SHAPE.hidden),
        "lm_head.weight": torch.randn(VOCAB, SHAPE.hidden, generator=generator) * INIT_STD,
    }
    tensors = {name: tensor.to(getattr(torch, SHAPE.dtype)) for name, tensor in tensors.items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    tmp.rename(path)
    return path


def word_tokenizer(text_path: Path, vocab_size: int):
    """A word-level fast tokenizer over the most frequent words of the calibration text (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Counter(re.findall(r"\S+", text_path.read_text(encoding="utf-8")))
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>"])}
    for word, _ in words.most_common(vocab_size - len(vocab)):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@contextmanager
def work_folder(work: Path | None, keep: bool, prefix: str) -> Iterator[Path]:
    """The folder a benchmark writes its models and outputs to (``--work``, ``--keep``).

    ``work`` when given (created if missing, never removed); else a new temp folder named ``prefix...``,
    removed at the end unless ``keep``.
    """
    folder = work or Path(tempfile.mkdtemp(prefix=prefix))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    finally:
        if not keep and work is None:
            shutil.rmtree(folder, ignore_errors=True)


def write_model(work: Path, depth: int, calib: Path, seed: int) -> Path:
    """A loadable model folder of ``depth`` blocks whose shards link into the shared pool."""
    pool = work / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    folder = work / f"llama-{depth}"
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    files = [write_block(pool, index, seed) for index in range(depth)] + [write_outside(pool, seed)]
    weight_map, total = {}, 0
    from safetensors import safe_open

    for file in files:
        link = folder / file.name
        if not link.exists():
            link.symlink_to(file.resolve())
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                weight_map[key] = file.name
                shape = handle.get_slice(key).get_shape()
                count = 1
                for size in shape:
                    count *= size
                total += SHAPE.bytes_per_param * count
    llama_config(depth).save_pretrained(folder)
    word_tokenizer(calib, VOCAB).save_pretrained(folder)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


# --------------------------------------------------------------------------- measurement
def measure(command: list[str], log_path: Path) -> dict:
    """Run ``command``; return its exit code, wall and CPU seconds and peak RSS (MiB) from ``os.wait4``."""
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    return {"rc": process.returncode, "wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def run_command(model: Path, out: Path, method: str, args) -> list[str]:
    """The ``reconstruct run`` command line of one benchmark row."""
    command = [
        sys.executable, "-m", "reconstruct", "run", "--model", str(model), "--out", str(out), "--force",
        "--pruner", "wanda", "--sparsity", "0.5", "--method", method, "--calib", str(args.calib),
        "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch),
        "--device", args.device, "--dtype", SHAPE.dtype, "--offload", args.offload,
    ]
    if method != "none":
        command += ["--recon-steps", str(args.recon_steps)]
    return command


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16], help="blocks per model")
    parser.add_argument("--calib", type=Path, default=DEFAULT_CALIB, help="calibration text file")
    parser.add_argument("--n-samples", type=int, default=8, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--micro-batch", type=int, default=8, help="samples per block forward")
    parser.add_argument("--no-masklora", action="store_true", help="skip the masklora rows")
    parser.add_argument("--recon-steps", type=int, default=4, help="masklora optimizer steps per block")
    parser.add_argument("--work", type=Path, default=None, help="folder for models and outputs (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the models and outputs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: cuda rows also report the peak GPU memory")
    parser.add_argument("--offload", default="cpu", help="where the activation streams live (auto, device, cpu, disk)")
    parser.add_argument("--hidden", type=int, default=Shape.hidden, help="residual width")
    parser.add_argument("--intermediate", type=int, default=Shape.intermediate, help="MLP width")
    parser.add_argument("--heads", type=int, default=Shape.heads, help="attention heads")
    parser.add_argument("--dtype", default=Shape.dtype, choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    global SHAPE
    SHAPE = Shape(args.hidden, args.intermediate, args.heads, args.dtype)
    if not args.calib.is_file():
        parser.error(f"--calib {args.calib}: no such file")

    depths = sorted(set(args.depths))
    with work_folder(args.work, args.keep, "bench-memory-") as work:
        started = time.perf_counter()
        models = {depth: write_model(work, depth, args.calib, args.seed) for depth in depths}
        build_seconds = time.perf_counter() - started

        baseline = measure([sys.executable, "-c", "import cli, reconstruct.jobs.run_job, reconstruct.methods"],
                           work / "baseline.log")
        plan = [(depth, "none") for depth in depths]
        if not args.no_masklora:
            plan += [(depth, "masklora") for depth in sorted({depths[0], depths[-1]})]
        rows = []
        for depth, method in plan:
            out = work / f"out-{depth}-{method}"
            log = work / f"run-{depth}-{method}.log"
            row = {"depth": depth, "method": method, **measure(run_command(models[depth], out, method, args), log)}
            if row["rc"] != 0:
                row["log_tail"] = log.read_text(errors="replace")[-2000:]
            else:
                report = json.loads((out / "reconstruct.json").read_text())
                row["reported_peak_rss_mb"] = round(report["peak_rss_mb"], 1)
                if report.get("peak_gpu_mb") is not None:
                    row["peak_gpu_mb"] = round(report["peak_gpu_mb"], 1)
                row["s_per_block"] = round(row["wall_s"] / depth, 2)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)

        summary: dict = {
            "bench": "memory-vs-depth",
            "model": {"family": "llama", "hidden": SHAPE.hidden, "intermediate": SHAPE.intermediate,
                      "heads": SHAPE.heads, "vocab": VOCAB, "dtype": SHAPE.dtype,
                      "block_params_m": round(SHAPE.block_params / 1e6, 1),
                      "block_mb": round(SHAPE.block_params * SHAPE.bytes_per_param / 2**20, 1)},
            "device": args.device, "offload": args.offload,
            "calibration": {"file": args.calib.name, "n_samples": args.n_samples, "seq_len": args.seq_len},
            "command": " ".join(run_command(Path("MODEL"), Path("OUT"), "none", args)[1:]),
            "build_seconds": round(build_seconds, 1),
            "import_baseline_rss_mb": baseline["peak_rss_mb"],
            "rows": rows,
        }
        summary.update(depth_scaling(rows))
        print(json.dumps(summary, indent=2))
        return summary


def depth_scaling(rows: list[dict]) -> dict:
    """Per method: peak RSS of the deepest over the shallowest run, and a linear fit of time against depth.

    Wall time includes a fixed cost (imports, planning, tokenizing, writing the untouched tensors), so
    seconds per block falls with depth; linear means ``time = fixed + per_block * depth`` fits every
    row: ``max_fit_error`` is the largest relative residual of that least-squares line.
    """
    result: dict = {}
    for method in ("none", "masklora"):
        done = sorted((row for row in rows if row["method"] == method and row["rc"] == 0), key=lambda r: r["depth"])
        if len(done) < 2:
            continue
        first, last = done[0], done[-1]
        result[f"ratio_peak{last['depth']}_peak{first['depth']}_{method}"] = round(
            last["peak_rss_mb"] / first["peak_rss_mb"], 3)
        if "peak_gpu_mb" in first and "peak_gpu_mb" in last:
            result[f"ratio_gpu_peak{last['depth']}_peak{first['depth']}_{method}"] = round(
                last["peak_gpu_mb"] / first["peak_gpu_mb"], 3)
        for key in ("wall_s", "cpu_s"):
            xs, ys = [row["depth"] for row in done], [row[key] for row in done]
            mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
            slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
            fixed = mean_y - slope * mean_x
            error = max(abs(fixed + slope * x - y) / y for x, y in zip(xs, ys))
            result[f"{key}_fit_{method}"] = {"fixed_s": round(fixed, 1), "per_block_s": round(slope, 2),
                                             "max_fit_error": round(error, 3)}
    return result


if __name__ == "__main__":
    main()
