"""Model-level LoRAPrune on a tiny LLaMA (grouped-query attention) with a resident trainer passed in as a parameter.

The trainer here is the plainest one that calls the three hooks (all blocks resident, one full
backward per step); the engine's streamed trainer calls the same hooks block by block.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY_CONFIGS
from pruners.loraprune_model import BlockLayout, LoRAPruneController, LoRAPruneSchedule
from pruners.loraprune_training import LoRAPruneHooks, prune_while_training
from pruners.lowrank import LowRankLinear, layer_seed, swap_module
from pruners.pattern import SparsityPattern
from pruners.structured import find_channel_groups, find_head_groups

LLAMA_ORDER = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
               ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
LINEARS = [name for group in LLAMA_ORDER for name in group]
STEPS = 10  # the last (10%) trains at the final masks


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def tiny_llama():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(TINY_CONFIGS["llama"]()).eval()  # 4 query heads, 2 kv heads


def attach_lora(model, rank: int = 4) -> list:
    """Plain LoRA adapters on every block linear (what the trainer's ``lora`` method attaches)."""
    params = []
    for index, block in enumerate(model.model.layers):
        for name in LINEARS:
            base = block.get_submodule(name)
            base.weight.requires_grad_(False)
            adapter = LowRankLinear(base, torch.ones(base.weight.shape, dtype=torch.bool), kind="lora", rank=rank,
                                    alpha=2.0 * rank, seed=layer_seed(index, name))
            swap_module(block, name, base, adapter)
            params += [adapter.lora_A, adapter.lora_B]
    return params


def resident_trainer(model, tokens: torch.Tensor, lr: float = 1e-2, reload_every_step: bool = False):
    """A model-level trainer: every step, the causal-LM loss over ``tokens``, AdamW on the adapters, the hooks.

    ``reload_every_step`` calls ``block_loaded`` before every step, as a streamed trainer does (its
    blocks are loaded afresh for each pass); otherwise once, as the resident path does.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    params = attach_lora(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    blocks = list(model.model.layers)

    def train(hooks: LoRAPruneHooks) -> None:
        for step in range(STEPS):
            for index, block in enumerate(blocks):
                if step == 0 or reload_every_step:
                    hooks.block_loaded(index, block)
            model(input_ids=tokens, labels=tokens).loss.backward()
            for index in reversed(range(len(blocks))):
                hooks.block_gradients_ready(index, blocks[index])
            optimizer.step()
            optimizer.zero_grad()
            hooks.step_done(step + 1)  # counted from 1, as the engine's trainer counts

    return train


def layouts(model, pattern: SparsityPattern) -> list[BlockLayout]:
    block = model.model.layers[0]
    shapes = {name: tuple(block.get_submodule(name).weight.shape) for name in LINEARS}
    groups = None
    if pattern.kind == "heads":
        groups = find_head_groups(LLAMA_ORDER, shapes, model.config)
    elif pattern.kind == "channels":
        groups = find_channel_groups(LLAMA_ORDER, shapes)
    return [BlockLayout(shapes, groups, pattern) for _ in model.model.layers]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "heads", "channels"])
def test_prune_while_training_ends_at_the_target_with_the_masks_it_trained(pattern):
    target = SparsityPattern.parse(pattern, {"unstructured": 0.5, "2:4": None, "heads": 0.5, "channels": 0.25}[pattern])
    model = tiny_llama()
    tokens = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    controller = LoRAPruneController(layouts(model, target), LoRAPruneSchedule(total_steps=STEPS))
    finals = prune_while_training(resident_trainer(model, tokens), controller)  # checks the exact target
    for index, block in enumerate(model.model.layers):
        in_force = controller.keep_masks(index, STEPS - 1)  # the last step trains at the final masks
        for name in LINEARS:
            adapter = block.get_submodule(name)
            assert adapter.provisional and adapter.keep_mask.equal(in_force[name]) and in_force[name].equal(finals[index][name])
    if pattern == "heads":  # 2 of 4 query heads; a kv head (shared by 2) goes only with both
        for masks in finals:
            removed = ~masks["self_attn.q_proj"][:, 0].reshape(4, -1).all(dim=1)
            kv_kept = masks["self_attn.k_proj"][:, 0].reshape(2, -1).all(dim=1)
            assert int(removed.sum()) == 2 and kv_kept.equal(~removed.reshape(2, 2).all(dim=1))
    sparsities = [event["sparsity"] for event in controller.history]
    assert sparsities == sorted(sparsities) and sparsities[-1] > 0


def test_blocks_loaded_once_or_every_step_train_the_same():
    """The resident path (masks moved at step_done) and a reloading one (masks at each load) agree bit for bit."""
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    results = []
    for reload in (False, True):
        model = tiny_llama()
        controller = LoRAPruneController(layouts(model, SparsityPattern(sparsity=0.5)), LoRAPruneSchedule(total_steps=STEPS))
        finals = prune_while_training(resident_trainer(model, tokens, reload_every_step=reload), controller)
        adapters = [model.model.layers[0].get_submodule(name) for name in LINEARS]
        results.append((finals, [adapter.lora_B.detach().clone() for adapter in adapters]))
    (masks_a, params_a), (masks_b, params_b) = results
    assert all(masks_a[i][name].equal(masks_b[i][name]) for i in range(len(masks_a)) for name in LINEARS)
    assert all(a.equal(b) for a, b in zip(params_a, params_b))


def test_pruned_weights_do_not_reach_the_output_during_training():
    """After the hooks load a block, its forward is P * (W + s B A): a pruned weight changes nothing."""
    model = tiny_llama()
    tokens = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(2))
    target = SparsityPattern(sparsity=0.5)
    controller = LoRAPruneController(layouts(model, target), LoRAPruneSchedule(total_steps=STEPS))
    prune_while_training(resident_trainer(model, tokens), controller)
    adapter = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, adapter.base.in_features)
    before = adapter(x)
    with torch.no_grad():
        adapter.base.weight[~adapter.keep_mask] += 1000.0
    assert adapter(x).equal(before)
