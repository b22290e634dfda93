"""How reconstruction settings trade block error for time, on one real block (picks the defaults).

Takes block K of a model, feeds it the dense model's activations for the calibration windows,
prunes it with Wanda, then reconstructs copies of it with each method and each (steps, batch, lr)
setting, printing one JSON line per run: the ratio of the block MSE after/before and the seconds.

    python bench/recon_defaults.py --calib ../shared/data/wikitext-2/valid.txt --block 5 --sparsity 0.7
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from calib.activations import ActivationStream
from calib.capture import capture_block_inputs
from calib.text_sources import read_text, sample_windows, tokenize_text
from pruners import SparsityPattern, get_pruner
from reconstruct.modelio.architecture import find_block_list, is_prunable_linear, weight_as_out_in
from reconstruct.methods import ReconSpec, attach_method, evaluate_mse, train_reconstruction
from reconstruct.modelio.source import resolve_model
from calib.hooks import feeding_statistics

SETTINGS = [(20, 1, 5e-4), (20, 1, 2e-3), (64, 2, 5e-4), (64, 2, 2e-3), (64, 2, 5e-3), (128, 4, 2e-3)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--methods", default="bias-ln,masklora,scalelora")
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--loss", default="mse", help="--recon-loss (the table in reconstruct/methods/spec.py: mse)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")

    folder = resolve_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = sample_windows(tokenize_text(read_text(args.calib), AutoTokenizer.from_pretrained(folder)),
                            args.n_samples, args.seq_len, 0)  # (n, T)
    _, blocks = find_block_list(model)
    hidden = model.config.hidden_size
    inputs = ActivationStream(args.n_samples, args.seq_len, hidden, torch.float32, cpu, "cpu")
    arguments = capture_block_inputs(model, blocks, tokens, 8, inputs.write, cpu)

    def forward(block, index=args.block):  # block ``index``'s own arguments (masks, rotary tables)
        return lambda x: arguments.run(block, index, x)

    def run_over(block, source, destination=None, index=args.block):
        with torch.no_grad():
            for start in range(0, args.n_samples, 8):
                rows = slice(start, start + 8)
                out = forward(block, index)(source.read(rows))
                if destination is not None:
                    destination.write(rows, out)

    for index in range(args.block):  # dense activations into block K
        run_over(blocks[index], inputs, inputs, index)
    block = blocks[args.block]
    targets = ActivationStream(args.n_samples, args.seq_len, hidden, torch.float32, cpu, "cpu")
    run_over(block, inputs, targets)

    linears = {name: module for name, module in block.named_modules() if is_prunable_linear(module)}
    pruner, pattern = get_pruner("wanda"), SparsityPattern.parse("unstructured", args.sparsity)
    stats = {name: pruner.new_stats(weight_as_out_in(m).shape[1], cpu) for name, m in linears.items()}
    with feeding_statistics(linears, stats):
        run_over(block, inputs)
    keep_masks = {}
    for name, module in linears.items():
        weight, keep_masks[name] = pruner.prune(weight_as_out_in(module).detach().float().clone(), stats[name], pattern)
        with torch.no_grad():
            weight_as_out_in(module).copy_(weight)
    pruned_mse = evaluate_mse(forward(block), inputs, targets, 8)
    print(json.dumps({"block": args.block, "sparsity": args.sparsity, "pruned_mse": pruned_mse}), flush=True)

    for method in args.methods.split(","):
        for steps, batch, lr in SETTINGS:
            trial = copy.deepcopy(block)
            trial_linears = {name: trial.get_submodule(name) for name in linears}
            handle = attach_method(method, trial, trial_linears, keep_masks, rank=16, alpha=32,
                                   bias_linears=set(linears), seed=0)
            spec = ReconSpec(method=method, steps=steps, batch_size=batch, micro_batch=batch, lr=lr, loss=args.loss)
            started = time.perf_counter()
            result = train_reconstruction(forward(trial), handle.trainable_parameters(), inputs, targets, spec,
                                          seed=0, eval_micro_batch=8)
            print(json.dumps({"method": method, "steps": steps, "batch": batch, "lr": lr,
                              "mse_ratio": result.mse_after / pruned_mse,
                              "seconds": round(time.perf_counter() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
