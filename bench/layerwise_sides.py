"""The layer-wise per-block step for ``bench/retrain_speed.py``: ours beside a plain torch loop.

One block (block 0 of the pruned model) with its captured inputs and the dense block's outputs as
targets. Ours is ``train_reconstruction`` over the method ``attach_method`` attaches; the plain loop
trains the same parameters (the same initial values) on the same tensors, in the same sample order
and micro-batches, written the way one would by hand: the block's own modules with the trainable
tensors put in (``torch.func.functional_call``), the MSE, ``backward``, ``torch.optim.AdamW`` and a
linear decay.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from calib.activations import ActivationStream
from calib.capture import BlockArguments, capture_block_inputs
from pruners.layers import weight_as_out_in
from pruners.lowrank import init_lora_a, layer_seed
from reconstruct.methods import attach_method
from reconstruct.methods.bias_norm import find_norms
from reconstruct.methods.spec import ReconSpec
from reconstruct.methods.train import train_reconstruction
from reconstruct.modelio.block_io import load_module_weights
from reconstruct.modelio.loaded import load_model
from reconstruct.retrain.trainables import block_linears, zero_pattern_masks

LR = 5e-3  # the layer-wise default
SEED = 0
EVAL_EVERY = ReconSpec().eval_every  # ours reports the mean loss since its last evaluation point


@dataclass
class BlockCase:
    """Block 0 of the pruned model, loaded, with its inputs and the dense block's outputs."""

    block: nn.Module
    linears: dict[str, nn.Module]
    bias_linears: set[str]
    arguments: BlockArguments
    inputs: ActivationStream  # (n, T, H) block 0's inputs
    targets: ActivationStream  # (n, T, H) the dense block 0's outputs

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.arguments.run(self.block, 0, hidden)


def _loaded_block(folder: Path, device: str, dtype: str):
    loaded = load_model(str(folder), device, dtype)
    load_module_weights(loaded.blocks[0], loaded.layout.block_prefix(0), loaded.reader, loaded.key_map,
                        loaded.device, loaded.dtype)
    return loaded


@torch.no_grad()
def block_case(pruned: Path, dense: Path, tokens: torch.Tensor, args) -> BlockCase:
    """Capture block 0's inputs of ``tokens`` (n, T) and the dense block's outputs on them."""
    loaded = _loaded_block(pruned, args.device, args.dtype)
    loaded.load_outside_blocks()
    n, seq_len = tokens.shape

    def stream() -> ActivationStream:
        return ActivationStream(n, seq_len, loaded.hidden_size, dtype=loaded.dtype, device=loaded.device, tier="cpu")

    inputs, targets = stream(), stream()
    arguments = capture_block_inputs(loaded.model, loaded.blocks, tokens, 1, inputs.write, loaded.device)
    dense_block = _loaded_block(dense, args.device, args.dtype).blocks[0]
    for row in range(n):
        targets.write(slice(row, row + 1), arguments.run(dense_block, 0, inputs.read(slice(row, row + 1))))
    linears = block_linears(loaded.blocks[0], loaded.layout)
    flagged = {name for names in loaded.layout.bias_flags.values() for name in names}
    bias_linears = {name for name, module in linears.items() if module.bias is not None or name in flagged}
    return BlockCase(loaded.blocks[0], linears, bias_linears, arguments, inputs, targets)


def _spec(method: str, steps: int, args) -> ReconSpec:
    return ReconSpec(method=method, steps=steps, lr=LR, rank=args.rank, alpha=2.0 * args.rank,
                     batch_size=args.recon_batch, micro_batch=1, loss="mse", val_fraction=0.0, guard=False)


def ours(case: BlockCase, method: str, steps: int, args) -> tuple[float, float, float]:
    """``train_reconstruction`` for ``steps`` steps: (seconds, CPU seconds per step, mean training loss as it reports it)."""
    handle = attach_method(method, case.block, case.linears, zero_pattern_masks(case.linears), rank=args.rank,
                           alpha=2.0 * args.rank, bias_linears=case.bias_linears, seed=SEED)
    try:
        started, cpu_started = time.perf_counter(), time.process_time()
        result = train_reconstruction(case.forward, handle.trainable_parameters(), case.inputs, case.targets,
                                      _spec(method, steps, args), seed=SEED, measure_before=False,
                                      measure_after=False)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        return wall / steps, cpu / steps, float(result.train_error)
    finally:
        handle.discard()


def _batches(n: int, batch: int, steps: int) -> list[torch.Tensor]:
    """The sample order of ``train_reconstruction`` (a fresh seeded permutation per epoch, each batch sorted)."""
    generator = torch.Generator(device="cpu").manual_seed(SEED)
    pending, batches = torch.empty(0, dtype=torch.long), []
    for _ in range(steps):
        while pending.numel() < batch:
            pending = torch.cat([pending, torch.randperm(n, generator=generator)])
        batches.append(torch.sort(pending[:batch]).values)
        pending = pending[batch:]
    return batches


def _plain_tensors(case: BlockCase, method: str, args) -> tuple[list[torch.Tensor], callable]:
    """The trainable tensors (ours' initial values) and ``overrides()``: module path → tensor for the forward."""
    block = case.block
    if method == "masklora":
        scale = 2.0  # alpha / rank
        factors = {}
        for name, linear in case.linears.items():
            weight = weight_as_out_in(linear)
            mask = (weight != 0).to(weight.dtype)
            a = init_lora_a(args.rank, weight.shape[1], layer_seed(SEED, name)).requires_grad_(True)
            b = torch.zeros(weight.shape[0], args.rank, requires_grad=True)
            factors[name] = (weight, mask, a, b)
        params = [t for _, _, a, b in factors.values() for t in (a, b)]
        return params, lambda: {f"{name}.weight": w + (b @ a) * scale * m for name, (w, m, a, b) in factors.items()}
    tensors = {f"{name}.{attr}": getattr(norm, attr).detach().clone().requires_grad_(True)
               for name, norm in find_norms(block).items() for attr in ("weight", "bias")
               if isinstance(getattr(norm, attr, None), torch.Tensor)}
    for name in sorted(case.bias_linears):
        out = weight_as_out_in(case.linears[name]).shape[0]
        tensors[f"{name}.bias"] = torch.zeros(out, requires_grad=True)
    return list(tensors.values()), lambda: tensors


def plain(case: BlockCase, method: str, steps: int, args) -> tuple[float, float, float]:
    """The plain loop for ``steps`` steps: (seconds, CPU seconds per step, mean training loss as ours reports it)."""
    params, overrides = _plain_tensors(case, method, args)
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    batch = min(args.recon_batch, case.inputs.n_samples)
    losses = []
    started, cpu_started = time.perf_counter(), time.process_time()
    for rows in _batches(case.inputs.n_samples, batch, steps):
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for row in rows.split(1):
            call = case.arguments.call(0, 1)
            out = torch.func.functional_call(case.block, overrides(), (case.inputs.read(row), *call.args), call.kwargs)
            out = out[0] if isinstance(out, (tuple, list)) else out
            loss = torch.nn.functional.mse_loss(out.float(), case.targets.read(row).float()) / batch
            loss.backward()
            step_loss += float(loss)
        optimizer.step()
        schedule.step()
        losses.append(step_loss)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    last = losses[(steps - 1) // EVAL_EVERY * EVAL_EVERY:]  # the interval ours' train_error covers
    return wall / steps, cpu / steps, sum(last) / len(last)
