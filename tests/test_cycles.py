"""--cycles K: K prune -> reconstruct steps per block, nested keep masks, exactly the target at the end."""

from __future__ import annotations

import pytest
import torch

import reconstruct.jobs.run_job as engine
import reconstruct.loop.pruning as pipeline  # the pruning steps of the block pipeline
from conftest import make_job
from pruners.masks import select_keep_mask
from pruners.pattern import SparsityPattern
from pruners.schedule import cycle_pattern, schedule_fraction
from reconstruct.methods import ReconSpec


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


# --------------------------------------------------------------------------- schedule
def test_cubic_and_linear_fractions_end_at_one():
    assert [round(schedule_fraction(c, 3, "cubic"), 4) for c in (1, 2, 3)] == [0.7037, 0.963, 1.0]
    assert [schedule_fraction(c, 4, "linear") for c in (1, 2, 3, 4)] == [0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="--cycle-schedule"):
        schedule_fraction(1, 2, "exponential")


@pytest.mark.parametrize("text,sparsity", [("unstructured", 0.7), ("2:4", None), ("heads", 0.5), ("channels", 0.3)])
def test_cycle_patterns_grow_and_the_last_is_the_target(text, sparsity):
    target = SparsityPattern.parse(text, sparsity)
    patterns = [cycle_pattern(target, c, 3, "linear") for c in (1, 2, 3)]
    assert patterns[-1] == target
    assert [p.sparsity for p in patterns] == sorted(p.sparsity for p in patterns)
    assert cycle_pattern(target, 1, 1) == target  # one cycle: the plain job


def test_nm_cycles_use_intermediate_nm_patterns():
    target = SparsityPattern.parse("2:8", None)
    assert [cycle_pattern(target, c, 3, "linear").label for c in (1, 2, 3)] == ["6:8", "4:8", "2:8"]
    first = cycle_pattern(SparsityPattern.parse("1:2", None), 1, 3, "linear")  # rounds to nothing pruned
    assert first.sparsity == 0.0


# --------------------------------------------------------------------------- nested selection
@pytest.mark.parametrize("text,sparsity,scope", [("unstructured", 0.6, "row"), ("unstructured", 0.6, "layer"),
                                                 ("2:4", None, "row")])
def test_select_keep_mask_nests_in_the_previous_mask_and_stays_exact(text, sparsity, scope):
    generator = torch.Generator().manual_seed(0)
    first = SparsityPattern.parse("unstructured" if text == "unstructured" else "3:4", 0.3 if text == "unstructured" else None, scope)
    target = SparsityPattern.parse(text, sparsity, scope)
    earlier = select_keep_mask(torch.rand(16, 32, generator=generator), first)
    later = select_keep_mask(torch.rand(16, 32, generator=generator), target, within=earlier)  # fresh scores
    assert not (later & ~earlier).any()  # nested: nothing un-pruned
    if target.kind == "nm":
        assert ((~later).reshape(16, 8, 4).sum(-1) == 2).all()
    elif scope == "row":
        assert ((~later).sum(1) == int(32 * 0.6)).all()
    else:
        assert int((~later).sum()) == int(16 * 32 * 0.6)


def test_a_previous_mask_sparser_than_the_pattern_is_refused():
    earlier = select_keep_mask(torch.rand(4, 8), SparsityPattern.parse("unstructured", 0.75))
    with pytest.raises(ValueError, match="earlier pruning cycle"):
        select_keep_mask(torch.rand(4, 8), SparsityPattern.parse("unstructured", 0.5), within=earlier)


# --------------------------------------------------------------------------- engine
def _record_masks(monkeypatch) -> dict[int, list[tuple[float, torch.Tensor]]]:
    """Record every keep mask prune_layer returns, per linear module."""
    recorded: dict[int, list[tuple[float, torch.Tensor]]] = {}
    original = pipeline.prune_layer

    def recording(module, pruner, stats, pattern, within=None):
        keep = original(module, pruner, stats, pattern, within)
        recorded.setdefault(id(module), []).append((pattern.sparsity, keep.clone()))
        return keep

    monkeypatch.setattr(pipeline, "prune_layer", recording)
    return recorded


@pytest.mark.parametrize(
    "arch,pruner,pattern,sparsity",
    [("llama", "wanda", "unstructured", 0.7), ("opt", "sparsegpt", "2:4", None), ("llama", "loraprune", "unstructured", 0.6)],
)
def test_three_cycles_nest_and_end_at_exactly_the_target(tiny_model_dir, small_calib_file, tmp_path, monkeypatch,
                                                          arch, pruner, pattern, sparsity):
    from dataclasses import replace

    recorded = _record_masks(monkeypatch)
    recon = ReconSpec(method="masklora", steps=3, lr=2e-3)
    job = make_job(tiny_model_dir(arch), tmp_path / "out", pruner, pattern, sparsity, calib=small_calib_file, recon=recon)
    job = replace(job, prune=replace(job.prune, cycles=3, loraprune_steps=4))
    report = engine.run_job(job)
    target = job.prune.pattern
    assert recorded and all(len(masks) == 3 for masks in recorded.values())  # 3 cycles on every linear of every block
    for masks in recorded.values():
        sparsities = [s for s, _ in masks]
        assert sparsities == sorted(sparsities) and sparsities[-1] == target.sparsity
        for (_, earlier), (_, later) in zip(masks, masks[1:]):
            assert not (later & ~earlier).any(), "a later cycle kept a weight an earlier cycle pruned"
        final = masks[-1][1]
        if target.kind == "nm":
            assert ((~final).reshape(final.shape[0], -1, 4).sum(-1) == 2).all()
        else:
            assert ((~final).sum(1) == int(final.shape[1] * target.sparsity)).all()
    for block in report["blocks"]:
        assert block["recon_steps"] == 3 * 3  # reconstructed after every cycle
        for value in block["sparsity"].values():
            # not a rounding tolerance: the exact per-row counts are asserted above; this bounds the report
            assert value == pytest.approx(target.sparsity, abs=0.02)
    assert report["job"]["cycles"] == {"cycles": 3, "schedule": "cubic"}


def test_heads_cycles_only_ever_add_heads(tiny_model_dir, small_calib_file, tmp_path, monkeypatch):
    from dataclasses import replace

    seen: list[tuple[int, list[int]]] = []
    original = pipeline.select_structured

    def recording(pattern, groups, importance, previous=None, per_kv_group=False):
        masks, removed = original(pattern, groups, importance, previous, per_kv_group)
        seen.append((id(importance[groups.query]), removed["heads"]))
        return masks, removed

    monkeypatch.setattr(pipeline, "select_structured", recording)
    job = make_job(tiny_model_dir("opt"), tmp_path / "out", "wanda", "heads", 0.5, calib=small_calib_file,
                   recon=ReconSpec(method="bias", steps=2))
    job = replace(job, prune=replace(job.prune, cycles=2, cycle_schedule="linear"))
    report = engine.run_job(job)
    per_block = [seen[i : i + 2] for i in range(0, len(seen), 2)]
    assert len(per_block) == len(report["blocks"])
    for (_, first), (_, second) in per_block:
        assert len(first) == 1 and len(second) == 2 and set(first) <= set(second)
