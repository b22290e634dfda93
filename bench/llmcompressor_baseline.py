"""Baseline: prune a local HF causal LM with vllm-project/llm-compressor.

Runs in a separate virtualenv with ``llmcompressor`` installed (see
``bench/requirements-llmcompressor.txt``); it does not import ``reconstruct``.
Everything is loaded from local files: the model folder given by ``--model`` and
a raw text file given by ``--calib-file``.

Calibration data: the whole text file is tokenized with the model's tokenizer
(no special tokens added), then ``--n-samples`` windows of ``--seq-len`` tokens
are drawn with ``numpy.random.default_rng(seed)``, start positions uniform in
``[0, n_tokens - seq_len)``. The windows are handed to ``oneshot`` as a
``datasets.Dataset`` with ``input_ids`` and ``attention_mask`` columns, so
llm-compressor skips its own dataset loading and tokenization.

Pruning: ``WandaPruningModifier`` or ``SparseGPTModifier`` with the given
sparsity and ``mask_structure`` ("0:0" for unstructured, "2:4" for 2:4),
targeting the decoder layers (``re:model.layers.\\d+$``; every Linear inside
them is pruned) with ``lm_head`` ignored. fp32 on CPU, batch size 1.

Only the ``oneshot`` call is timed (wall clock; its user+sys CPU time is
reported too as ``cpu_seconds``). Peak RSS is the process's
``ru_maxrss`` (KiB on Linux) read right after ``oneshot`` returns (so it
covers model load, tokenization and pruning, not the save), reported in MB
(KiB / 1024).
The pruned model is saved dense with ``save_pretrained(save_compressed=False)``
and the achieved sparsity is measured from the saved safetensors over the
decoder layers' 2-D (Linear) weights.

Prints exactly one JSON line on stdout. llm-compressor's loguru logger writes
to stdout, so file descriptor 1 is pointed at stderr for the whole run and the
JSON line is written to the saved original stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import time

# Never reach for the hub: everything here is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

DECODER_LINEAR_RE = re.compile(r"^model\.layers\.\d+\..+\.weight$")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local HF model folder")
    p.add_argument("--calib-file", required=True, help="raw text file for calibration")
    p.add_argument("--n-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", choices=["wanda", "sparsegpt"], required=True)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--pattern", choices=["unstructured", "2:4"], default="unstructured")
    p.add_argument("--out", required=True, help="output folder for the pruned model")
    return p.parse_args(argv)


def calibration_windows(tokenizer, path, n_samples, seq_len, seed):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n_tokens = len(ids)
    if n_tokens <= seq_len:
        raise SystemExit(f"calibration text has {n_tokens} tokens, need > {seq_len}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n_tokens - seq_len, size=n_samples)
    windows = [ids[s : s + seq_len] for s in starts.tolist()]
    return windows, n_tokens, starts.tolist()


def build_modifier(method, sparsity, pattern):
    mask_structure = "0:0" if pattern == "unstructured" else pattern
    common = dict(
        sparsity=sparsity,
        mask_structure=mask_structure,
        targets=[r"re:model.layers.\d+$"],
        ignore=["re:.*lm_head"],
    )
    if method == "wanda":
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        return WandaPruningModifier(**common)
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    return SparseGPTModifier(**common)


def measure_sparsity(out_dir):
    """Fraction of zeros over decoder-layer Linear weights in the saved files."""
    from safetensors import safe_open

    files = sorted(f for f in os.listdir(out_dir) if f.endswith(".safetensors"))
    if not files:
        raise SystemExit(f"no .safetensors written to {out_dir}")
    zeros = total = 0
    n24_violations = 0
    names = []
    for fname in files:
        with safe_open(os.path.join(out_dir, fname), framework="pt") as f:
            for key in f.keys():
                if not DECODER_LINEAR_RE.match(key):
                    continue
                t = f.get_tensor(key)
                if t.dim() != 2:  # norms are 1-D
                    continue
                names.append(key)
                zeros += int((t == 0).sum())
                total += t.numel()
                if t.shape[1] % 4 == 0:
                    nz_per_group = (t.reshape(t.shape[0], -1, 4) != 0).sum(-1)
                    n24_violations += int((nz_per_group > 2).sum())
    if total == 0:
        raise SystemExit("no decoder Linear weights found in saved tensors")
    return zeros / total, len(names), n24_violations


def main(argv=None):
    args = parse_args(argv)
    # Keep stdout for the single JSON line: library logging (loguru sinks
    # bound to sys.stdout, print calls) goes to stderr instead.
    sys.stdout.flush()
    json_fd = os.dup(1)
    os.dup2(2, 1)
    json_out = os.fdopen(json_fd, "w")
    torch.manual_seed(args.seed)

    import transformers
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()

    windows, n_tokens, starts = calibration_windows(
        tokenizer, args.calib_file, args.n_samples, args.seq_len, args.seed
    )
    print(
        f"[baseline] calib tokens={n_tokens} windows={len(windows)}x{args.seq_len} "
        f"first starts={starts[:4]} torch threads={torch.get_num_threads()}",
        file=sys.stderr,
    )
    ds = Dataset.from_dict(
        {
            "input_ids": windows,
            "attention_mask": [[1] * len(w) for w in windows],
        }
    )

    modifier = build_modifier(args.method, args.sparsity, args.pattern)

    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=ds,
        recipe=[modifier],
        num_calibration_samples=args.n_samples,
        max_seq_length=args.seq_len,
        shuffle_calibration_samples=False,
        batch_size=1,
    )
    seconds = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)

    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, save_compressed=False)
    tokenizer.save_pretrained(args.out)

    achieved, n_tensors, n24_bad = measure_sparsity(args.out)
    print(
        f"[baseline] measured {n_tensors} decoder Linear tensors; "
        f"groups of 4 with >2 nonzeros: {n24_bad}",
        file=sys.stderr,
    )

    result = {
        "method": args.method,
        "sparsity": args.sparsity,
        "pattern": args.pattern,
        "seconds": round(seconds, 3),
        "peak_rss_mb": round(peak_rss_mb, 1),
        "llmcompressor_version": llmcompressor.__version__,
        "transformers_version": transformers.__version__,
        "achieved_sparsity": round(achieved, 6),
        # extras: CPU time of the oneshot call (less sensitive than wall time
        # to other work sharing the cores) and the thread count it ran with
        "cpu_seconds": round(cpu_seconds, 3),
        "torch_threads": torch.get_num_threads(),
    }
    sys.stdout.flush()
    print(json.dumps(result), file=json_out, flush=True)


if __name__ == "__main__":
    main()
