"""Model-level LoRAPrune: the authors' schedule, the controller's importance and masks, the trainer hooks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pruners.loraprune_model import BlockLayout, LoRAPruneController, LoRAPruneSchedule
from pruners.loraprune_training import LoRAPruneHooks, check_at_target, step_importance
from tolerances import assert_within, gamma
from pruners.lowrank import LowRankLinear
from pruners.masks import select_keep_mask
from pruners.pattern import SparsityPattern
from pruners.structured import find_channel_groups, find_head_groups

LLAMA_ORDER = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
               ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
# SmolLM2's head geometry, small: 9 query heads of 4, 3 key/value heads, hidden 36, 24 MLP channels
GQA_SHAPES = {"self_attn.q_proj": (36, 36), "self_attn.k_proj": (12, 36), "self_attn.v_proj": (12, 36),
              "self_attn.o_proj": (36, 36), "mlp.gate_proj": (24, 36), "mlp.up_proj": (24, 36),
              "mlp.down_proj": (36, 24)}
GQA_CONFIG = SimpleNamespace(model_type="llama", num_attention_heads=9, num_key_value_heads=3, head_dim=4, hidden_size=36)
PATTERNS = {
    "row50": SparsityPattern(sparsity=0.5, scope="row"),
    "layer70": SparsityPattern(sparsity=0.7, scope="layer"),
    "2:4": SparsityPattern.parse("2:4", None),
    "heads 2/9": SparsityPattern.parse("heads", 2 / 9),
    "heads 3/9": SparsityPattern.parse("heads", 3 / 9),
    "channels 40%": SparsityPattern.parse("channels", 0.4),
}


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def layout_for(pattern: SparsityPattern, shapes=GQA_SHAPES, order=LLAMA_ORDER, config=GQA_CONFIG) -> BlockLayout:
    """The block layout a pattern needs (heads / channels groups found as the engine finds them)."""
    groups = None
    if pattern.kind == "heads":
        groups = find_head_groups(order, shapes, config)
    elif pattern.kind == "channels":
        groups = find_channel_groups(order, shapes)
    return BlockLayout(shapes=dict(shapes), groups=groups, pattern=pattern)


# --------------------------------------------------------------------------- schedule
def test_schedule_is_the_authors_cubic_ramp_with_warm_up_and_cool_down():
    schedule = LoRAPruneSchedule(total_steps=20)  # warm-up: steps <= 2; cool-down: steps > 18
    assert [schedule.fraction(step) for step in (0, 2)] == [0.0, 0.0]
    assert schedule.fraction(10) == 1 - (1 - (10 - 2) / 16) ** 3 == 0.875
    assert schedule.fraction(19) == 1.0
    events = schedule.events()
    fractions = list(events.values())
    assert min(events) == 2 and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert events[9] == schedule.fraction(10)  # the masks in force at a step are at its fraction
    assert max(events) == 17  # steps 18 and 19 (the last 10%) train at the final masks


@pytest.mark.parametrize("steps", [1, 2, 5, 7])
def test_short_runs_end_at_the_target(steps):
    events = LoRAPruneSchedule(total_steps=steps).events()
    assert events[max(events)] == 1.0 and max(events) <= steps - 1


def test_prune_every_spaces_the_ramp_events():
    events = LoRAPruneSchedule(total_steps=100, prune_every=10).events()
    assert list(events) == [19, 29, 39, 49, 59, 69, 79, 89]


def test_schedule_rejects_bad_settings():
    with pytest.raises(ValueError, match="--loraprune-steps"):
        LoRAPruneSchedule(total_steps=0)
    with pytest.raises(ValueError, match="sum below 1"):
        LoRAPruneSchedule(total_steps=10, warmup=0.5, cooldown=0.5)


# --------------------------------------------------------------------------- the criterion by hand
def exact_adapter(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, alpha: float) -> LowRankLinear:
    """A LoRA adapter with the given integer-valued factors (float32 arithmetic on them is exact)."""
    base = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        base.weight.copy_(weight)
    base.weight.requires_grad_(False)
    adapter = LowRankLinear(base, torch.ones(weight.shape, dtype=torch.bool), kind="lora", rank=lora_a.shape[0],
                            alpha=alpha, seed=0)
    with torch.no_grad():
        adapter.lora_A.copy_(lora_a)
        adapter.lora_B.copy_(lora_b)
    return adapter


def paper_importance(weight, lora_a, lora_b, scale, x, c):
    """LoRAPrune's criterion in plain Python (exact integers) for the loss ``sum(c * (x @ W'^T))``.

    ``dL/dW' = c^T x``; ``dL/dB = s dL/dW' A^T``; ``dL/dA = s B^T dL/dW'``;
    ``G = dB A + B dA - dB dA``; importance ``|G * (W + s B A)|``.
    """
    def matmul(p, q):
        return [[sum(p[i][k] * q[k][j] for k in range(len(q))) for j in range(len(q[0]))] for i in range(len(p))]

    def transpose(p):
        return [list(row) for row in zip(*p)]

    w, a, b, xs, cs = (t.long().tolist() for t in (weight, lora_a, lora_b, x, c))
    ba = matmul(b, a)
    adapted = [[w[i][j] + scale * ba[i][j] for j in range(len(w[0]))] for i in range(len(w))]
    d_w = matmul(transpose(cs), xs)  # (out, in)
    d_b = [[scale * v for v in row] for row in matmul(d_w, transpose(a))]  # (out, r)
    d_a = [[scale * v for v in row] for row in matmul(transpose(b), d_w)]  # (r, in)
    g1, g2, g3 = matmul(d_b, a), matmul(b, d_a), matmul(d_b, d_a)
    return [[abs((g1[i][j] + g2[i][j] - g3[i][j]) * adapted[i][j]) for j in range(len(w[0]))] for i in range(len(w))]


def integer_case(seed: int, out_f: int = 4, in_f: int = 6, rank: int = 2, tokens: int = 3):
    generator = torch.Generator().manual_seed(seed)

    def ints(*shape):
        return torch.randint(-3, 4, shape, generator=generator).float()

    return ints(out_f, in_f), ints(rank, in_f), ints(out_f, rank), ints(tokens, in_f), ints(tokens, out_f)


def test_importance_equals_the_papers_formula_by_hand_on_one_layer():
    """Integer inputs keep every float32 operation exact, so the comparison is exact (no tolerance)."""
    weight, lora_a, lora_b, x, c = integer_case(seed=1)
    adapter = exact_adapter(weight, lora_a, lora_b, alpha=4.0)  # scale alpha / r = 2
    (c * adapter(x)).sum().backward()
    expected = torch.tensor(paper_importance(weight, lora_a, lora_b, 2, x, c), dtype=torch.float32)
    assert step_importance(adapter).equal(expected)
    assert bool((expected > 0).any())


def mlp_block(seed: int) -> nn.Module:
    """A block with one MLP: ``down(up(x))``, each linear a LoRA adapter with integer factors."""
    up, down = integer_case(seed=seed, out_f=4, in_f=6), integer_case(seed=seed + 1, out_f=6, in_f=4)
    block = nn.Module()
    block.mlp = nn.Module()
    block.mlp.up_proj = exact_adapter(*up[:3], alpha=4.0)
    block.mlp.down_proj = exact_adapter(*down[:3], alpha=4.0)
    block.forward = lambda x: block.mlp.down_proj(block.mlp.up_proj(x))
    return block


def test_channel_scores_are_the_authors_normalised_group_sums_averaged_over_steps():
    """EMA over steps of (up's row sums / their norm + down's column sums / their norm), as update_sensitivity_dict."""
    block = mlp_block(seed=2)
    shapes = {"mlp.up_proj": (4, 6), "mlp.down_proj": (6, 4)}
    groups = find_channel_groups([["mlp.up_proj"], ["mlp.down_proj"]], shapes)
    controller = LoRAPruneController([BlockLayout(shapes, groups, SparsityPattern.parse("channels", 0.5))],
                                     LoRAPruneSchedule(total_steps=10))
    hooks = LoRAPruneHooks(controller)
    expected = torch.zeros(4, dtype=torch.float64)
    steps = 3
    for step in range(steps):
        hooks.block_loaded(0, block)
        block.mlp.up_proj.zero_grad()
        block.mlp.down_proj.zero_grad()
        x, c = integer_case(seed=10 + step, in_f=6, out_f=6)[3:]
        (c * block.forward(x)).sum().backward()
        rows = step_importance(block.mlp.up_proj).double().sum(dim=1)  # (4,) channel = row of up
        cols = step_importance(block.mlp.down_proj).double().sum(dim=0)  # (4,) channel = column of down
        expected = 0.9 * expected + 0.1 * (rows / rows.norm() + cols / cols.norm())
        hooks.block_gradients_ready(0, block)
        hooks.step_done(step + 1)
    got = controller.store.load(0)["ema.groups"]
    # each normalised term: a float32 sum of 6 exact-integer terms and a norm of 4 squares, a sqrt and a
    # division (at most 6 + 4 + 2 roundings, relative); then one addition and two EMA roundings per step
    per_step = gamma(6 + 4 + 2 + 1 + 2)
    assert_within(got, expected, steps * per_step * 2.0)  # every term is <= 1, so every step's score <= 2


def test_unstructured_ema_per_weight_starts_at_zero():
    weight, lora_a, lora_b, x, c = integer_case(seed=4)
    block = nn.Module()
    block.proj = exact_adapter(weight, lora_a, lora_b, alpha=4.0)
    controller = LoRAPruneController([BlockLayout({"proj": (4, 6)}, pattern=SparsityPattern(sparsity=0.5))],
                                     LoRAPruneSchedule(total_steps=10))
    hooks = LoRAPruneHooks(controller)
    hooks.block_loaded(0, block)
    (c * block.proj(x)).sum().backward()
    hooks.block_gradients_ready(0, block)
    expected = step_importance(block.proj).double() * 0.1  # decay 0.9 from 0: one rounding of a product
    assert_within(controller.store.load(0)["ema.proj"], expected, gamma(1) * expected.abs())


# --------------------------------------------------------------------------- the controller's masks
def run_controller(controller: LoRAPruneController, seed: int = 0) -> list[list[dict[str, torch.Tensor]]]:
    """Feed random importance for every step; return the masks in force at every step, per block."""
    generator = torch.Generator().manual_seed(seed)
    seen = []
    for step in range(controller.schedule.total_steps):
        seen.append([controller.keep_masks(index, step) for index in range(len(controller.layouts))])
        for index, layout in reversed(list(enumerate(controller.layouts))):  # backward order
            importance = {name: torch.rand(shape, generator=generator) for name, shape in layout.shapes.items()}
            controller.accumulate(index, step, importance)
        controller.step_done(step)
    return seen


def is_subset(inner: dict[str, torch.Tensor], outer: dict[str, torch.Tensor]) -> bool:
    return all(not bool((inner[name] & ~outer[name]).any()) for name in outer)


@pytest.mark.parametrize("label", list(PATTERNS))
def test_masks_only_shrink_and_end_exactly_at_the_target(label):
    pattern = PATTERNS[label]
    controller = LoRAPruneController([layout_for(pattern)] * 2, LoRAPruneSchedule(total_steps=12))
    seen = run_controller(controller)
    for before, after in zip(seen, seen[1:]):
        for index in range(2):
            assert is_subset(after[index], before[index])
    assert all(mask.all() for mask in seen[0][0].values())  # nothing pruned in the warm-up
    for index in range(2):
        final = controller.final_masks(index)
        check_at_target(controller, index, final)
        assert all(final[name].equal(mask) for name, mask in seen[-1][index].items())  # the cool-down trains at them
    sparsities = [event["sparsity"] for event in controller.history]
    assert sparsities == sorted(sparsities) and len(sparsities) > 2
    ratios = [event["importance_ratio"] for event in controller.history if event["importance_ratio"] is not None]
    assert ratios and all(ratio > 0 for ratio in ratios)
    if pattern.structured:  # the groups a step removes score below every group it keeps
        assert all(ratio <= 1 for ratio in ratios)


@pytest.mark.parametrize("label", ["row50", "layer70", "2:4"])
def test_per_weight_final_masks_are_select_keep_mask_of_the_average(label):
    """The target selection is select_keep_mask of the importance average, nested in the last ramp mask."""
    pattern = PATTERNS[label]
    controller = LoRAPruneController([layout_for(pattern)], LoRAPruneSchedule(total_steps=6))
    generator = torch.Generator().manual_seed(3)
    for step in range(6):
        before = controller.keep_masks(0, step)
        importance = {name: torch.rand(shape, generator=generator) for name, shape in GQA_SHAPES.items()}
        controller.accumulate(0, step, importance)
        controller.step_done(step)
    record = controller.store.load(0)
    for name in GQA_SHAPES:
        assert controller.final_masks(0)[name].equal(select_keep_mask(record[f"ema.{name}"], pattern, before[name]))


def test_heads_respect_grouped_query_attention():
    """2 then 6 of 9 query heads; a key/value head goes only with all 3 of its query heads."""
    for count in (2, 6):
        pattern = SparsityPattern.parse("heads", count / 9)
        controller = LoRAPruneController([layout_for(pattern)], LoRAPruneSchedule(total_steps=8))
        run_controller(controller, seed=count)
        final = controller.final_masks(0)
        removed = ~final["self_attn.q_proj"][:, 0].reshape(9, 4).all(dim=1)  # (9,) query heads
        assert int(removed.sum()) == count
        assert final["self_attn.o_proj"][0].reshape(9, 4).all(dim=1).equal(~removed)
        kv_removed = removed.reshape(3, 3).all(dim=1)  # (3,) a kv head is shared by 3 query heads
        for name in ("self_attn.k_proj", "self_attn.v_proj"):
            assert final[name][:, 0].reshape(3, 4).all(dim=1).equal(~kv_removed)
        assert all(final[name].all() for name in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))


def test_per_kv_group_heads_remove_the_same_count_from_every_group():
    pattern = SparsityPattern.parse("heads", 3 / 9)
    controller = LoRAPruneController([layout_for(pattern)], LoRAPruneSchedule(total_steps=8), per_kv_group=True)
    run_controller(controller)
    removed = ~controller.final_masks(0)["self_attn.q_proj"][:, 0].reshape(9, 4).all(dim=1)
    assert removed.reshape(3, 3).sum(dim=1).tolist() == [1, 1, 1]


def test_new_masks_apply_from_the_next_step_only():
    """Chosen during a step's backward, they must not change the block before that step ends."""
    pattern = PATTERNS["row50"]
    controller = LoRAPruneController([layout_for(pattern)], LoRAPruneSchedule(total_steps=10))
    step = min(controller.schedule.events())
    run_steps = {name: torch.ones(shape, dtype=torch.bool) for name, shape in GQA_SHAPES.items()}
    for current in range(step + 1):
        controller.accumulate(0, current, {name: torch.rand(shape) for name, shape in GQA_SHAPES.items()})
        controller.step_done(current)
    assert all(controller.keep_masks(0, step)[name].equal(run_steps[name]) for name in GQA_SHAPES)
    assert not all(controller.keep_masks(0, step + 1)[name].all() for name in GQA_SHAPES)


def test_step_done_refuses_a_step_whose_blocks_did_not_all_report():
    controller = LoRAPruneController([layout_for(PATTERNS["row50"])] * 2, LoRAPruneSchedule(total_steps=1))
    controller.accumulate(1, 0, {name: torch.rand(shape) for name, shape in GQA_SHAPES.items()})
    with pytest.raises(RuntimeError, match=r"blocks \[0\]"):
        controller.step_done(0)
