"""Where a pruned model's block error sits: which tokens and channels hold the squared error.

Runs the dense and a pruned model (any ``reconstruct run`` output) on calibration-style windows
and prints one JSON line per block output: the MSE against the dense model's hidden state, the
share of the squared error at the window's first position and in the three largest channels,
the MSE without the first position, and the token-relative error (``--recon-loss
token-relative``). A first-position share near 1 means the MSE (PERP's objective, and the guard's
judge under ``--recon-loss mse``) measures one massive-activation token and little else.

    python bench/error_share.py --pruned runs/guard/wanda-s0.7-none-n-samples-8 \\
        --data ../shared/data/wikitext-2/valid.txt --windows 4 --seq-len 256
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from calib.text_sources import read_text, sample_windows, tokenize_text
from reconstruct.methods.loss import error_terms
from reconstruct.modelio.architecture import find_block_list
from reconstruct.modelio.source import resolve_model


@torch.no_grad()
def hidden_states(folder, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The model's residual stream after each block, (n, T, H) each; the last one before the final norm."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    states = []
    _, blocks = find_block_list(model)
    handles = [block.register_forward_hook(lambda module, args, out: states.append(
        out[0] if isinstance(out, tuple) else out)) for block in blocks]
    model(tokens)
    for handle in handles:
        handle.remove()
    return tuple(states)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="the dense model")
    parser.add_argument("--pruned", required=True, help="a pruned model folder")
    parser.add_argument("--data", required=True)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dense_folder = resolve_model(args.model)
    text_tokens = tokenize_text(read_text(args.data), AutoTokenizer.from_pretrained(dense_folder))
    tokens = sample_windows(text_tokens, args.windows, args.seq_len, args.seed)  # (n, T)
    dense, pruned = hidden_states(dense_folder, tokens), hidden_states(args.pruned, tokens)
    for index, (want, got) in enumerate(zip(dense, pruned)):
        squared = (got - want) ** 2  # (n, T, H)
        total = squared.sum()
        by_channel = squared.sum(dim=(0, 1))  # (H,)
        print(json.dumps({
            "block": index + 1,
            "mse": float(squared.mean()),
            "first_position_share": round(float(squared[:, 0].sum() / total), 4),
            "top3_channel_share": round(float(by_channel.topk(3).values.sum() / total), 4),
            "top3_channels": by_channel.topk(3).indices.tolist(),
            "mse_without_first_position": float(squared[:, 1:].mean()),
            "token_relative": float(error_terms(got, want, "token-relative").mean()),
            "dense_max_abs": round(float(want.abs().max()), 1),
        }))


if __name__ == "__main__":
    main()
