"""The reconstruction guard: held-out calibration samples decide whether a block keeps its repair."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import cli
from conftest import make_job
from reconstruct.parallel import distributed
from reconstruct.jobs.run_job import run_job
from reconstruct.methods import ReconSpec, split_samples
from reconstruct.methods.snapshot import BlockSnapshot
from reconstruct.methods.samples import MANY_EPOCHS, SampleSplit, local_rows, log_training_budget

DIVERGING_LR = 50.0  # AdamW moves every trained bias / norm weight by ~50 per step: the block error explodes


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


# --------------------------------------------------------------------------- the split
@pytest.mark.parametrize(("n", "fraction", "n_val"), [(8, 0.125, 1), (4, 0.125, 1), (16, 0.125, 2), (64, 0.125, 8),
                                                      (2, 0.9, 1), (8, 0.0, 0), (1, 0.5, 0)])
def test_split_is_seeded_disjoint_and_sized(n, fraction, n_val):
    split = split_samples(n, fraction, seed=3)
    again = split_samples(n, fraction, seed=3)
    assert torch.equal(split.train, again.train) and torch.equal(split.val, again.val)
    assert split.val.numel() == n_val
    assert sorted(split.train.tolist() + split.val.tolist()) == list(range(n))  # disjoint, covers every sample
    assert split.train.numel() >= 1
    assert torch.equal(split.val, torch.sort(split.val).values)


def test_split_depends_on_the_job_seed_not_the_global_rng():
    torch.manual_seed(0)
    first = split_samples(64, 0.125, seed=1)
    torch.manual_seed(123)
    assert torch.equal(split_samples(64, 0.125, seed=1).val, first.val)
    assert any(not torch.equal(split_samples(64, 0.125, seed=s).val, first.val) for s in (2, 3, 4))


def test_split_is_the_same_on_every_rank_and_the_ranks_rows_cover_it(monkeypatch):
    held = []
    for rank in range(2):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: distributed.World(rank, 2))
        split = split_samples(16, 0.25, seed=0)
        shard = distributed.split_samples(16)
        held.append((split, local_rows(split.val, shard) + shard.start))
    assert torch.equal(held[0][0].val, held[1][0].val) and torch.equal(held[0][0].train, held[1][0].train)
    assert sorted(torch.cat([rows for _, rows in held]).tolist()) == held[0][0].val.tolist()


# --------------------------------------------------------------------------- budget in data
@pytest.mark.parametrize(("epochs", "batch", "n_train", "steps"), [(2.0, 2, 7, 7), (0.5, 2, 3, 1), (1.0, 4, 3, 1),
                                                                  (3.0, 2, 56, 84)])
def test_epochs_convert_to_steps(epochs, batch, n_train, steps):
    spec = ReconSpec(epochs=epochs, batch_size=batch)
    assert spec.steps_for(n_train) == steps
    assert spec.passes(n_train) >= epochs  # ceil: never fewer passes than asked


def test_many_passes_over_few_samples_warn_once(caplog):
    with caplog.at_level(logging.INFO):
        log_training_budget(ReconSpec(), split_samples(8, 0.125, 0))  # 64 steps × 2 over 7 samples
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "passes over 7 training samples" in warnings[0].getMessage()
    assert ReconSpec().passes(7) > MANY_EPOCHS
    caplog.clear()
    with caplog.at_level(logging.INFO):
        log_training_budget(ReconSpec(epochs=4), split_samples(8, 0.125, 0))
        log_training_budget(ReconSpec(epochs=4), split_samples(1, 0.125, 0))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "no held-out validation samples (only 1 calibration sample(s))" in caplog.text


@pytest.mark.parametrize(("flags", "message"), [
    (["--recon-val", "1"], "--recon-val"),
    (["--recon-epochs", "0"], "--recon-epochs"),
    (["--recon-steps", "4", "--recon-epochs", "2"], "not both"),
])
def test_bad_guard_flags_exit_2_naming_the_flag(flags, message, tmp_path):
    result = CliRunner().invoke(cli.app, ["run", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "o"), *flags])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- snapshot
def test_snapshot_restores_values_order_and_removes_an_added_bias():
    block = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False), torch.nn.LayerNorm(3))
    before = {name: p.clone() for name, p in block.state_dict().items()}
    snapshot = BlockSnapshot(block)
    with torch.no_grad():
        block[0].weight.add_(1.0)
        block[1].weight = torch.nn.Parameter(torch.zeros(3))  # a new object in the slot
        block[0].bias = torch.nn.Parameter(torch.ones(3))  # a bias the block did not have
    snapshot.restore()
    after = block.state_dict()
    assert list(after) == list(before) and block[0].bias is None
    assert all(torch.equal(after[name], value) for name, value in before.items())


# --------------------------------------------------------------------------- the guard in the engine
def _tensors(out):
    tensors = {}
    for path in sorted(out.glob("model-*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.fixture(scope="module")
def plain_prune(tiny_model_dir, small_calib_file, tmp_path_factory):
    """``--method none``: the pruned-only model every undone repair must equal."""
    out = tmp_path_factory.mktemp("plain") / "out"
    job = make_job(tiny_model_dir("llama"), out, "wanda", sparsity=0.5, calib=small_calib_file,
                   recon=ReconSpec(method="none"))
    run_job(job)
    return out


def _guarded_job(tiny_model_dir, small_calib_file, out, **recon):
    spec = ReconSpec(**{"method": "bias-ln", "steps": 16, **recon})
    return make_job(tiny_model_dir("llama"), out, "wanda", sparsity=0.5, calib=small_calib_file, recon=spec)


def test_a_repair_that_raises_the_validation_error_is_undone_bit_for_bit(tiny_model_dir, small_calib_file, tmp_path,
                                                                         plain_prune):
    report = run_job(_guarded_job(tiny_model_dir, small_calib_file, tmp_path / "out", lr=DIVERGING_LR))
    linears = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")
    for block in report["blocks"]:
        assert block["recon_kept"] is False and block["recon_stopped_at"] == 0
        assert sorted(block["added_biases"]) == sorted(linears)  # bias-ln's biases stay, as zeros: the config says so
        assert block["val_after"] >= block["val_before"]
    got, want = _tensors(tmp_path / "out"), _tensors(plain_prune)
    zero_biases = {f"model.layers.{index}.{name}.bias" for index in range(3) for name in linears}
    assert got.keys() == want.keys() | zero_biases
    assert all(torch.equal(got[name], want[name]) for name in want), "an undone block differs from the pruned one"
    assert all(not got[name].any() for name in zero_biases)  # a zero bias changes no output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config == {**json.loads((plain_prune / "config.json").read_text()), "attention_bias": True, "mlp_bias": True}
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| blocks kept their repair | 0 of 3 " in markdown
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| 1 |")]  # blocks numbered from 1
    assert [cell.strip() for cell in rows[0][-3:]] == [f"{report['blocks'][0]['val_after']:.3e}", "undone", "0"]


def test_without_the_guard_the_diverged_repair_is_kept(tiny_model_dir, small_calib_file, tmp_path, plain_prune):
    report = run_job(_guarded_job(tiny_model_dir, small_calib_file, tmp_path / "out", lr=DIVERGING_LR, guard=False))
    assert all(block["recon_kept"] is None and block["recon_steps"] == 16 for block in report["blocks"])
    first = report["blocks"][0]  # later blocks start from its wreck, where anything is an improvement
    assert first["val_after"] > 100 * first["val_before"]  # measured, not acted on
    got, want = _tensors(tmp_path / "out"), _tensors(plain_prune)
    assert got.keys() != want.keys()  # the added biases stayed


def test_kept_repairs_are_better_on_validation_and_stop_at_the_best_step(tiny_model_dir, small_calib_file, tmp_path):
    report = run_job(_guarded_job(tiny_model_dir, small_calib_file, tmp_path / "out", lr=5e-3, eval_every=4))
    for block in report["blocks"]:
        assert block["recon_kept"] == (block["val_after"] < block["val_before"])
        assert block["recon_stopped_at"] in (0, 4, 8, 12, 16)
        assert block["train_error"] is not None and 0 < block["recon_steps"] <= 16
    assert any(block["recon_kept"] for block in report["blocks"])


def test_cycles_apply_the_guard_per_cycle(tiny_model_dir, small_calib_file, tmp_path, plain_prune, caplog):
    job = _guarded_job(tiny_model_dir, small_calib_file, tmp_path / "out", lr=DIVERGING_LR, steps=8)
    job = replace(job, prune=replace(job.prune, cycles=2))
    with caplog.at_level(logging.INFO, logger="reconstruct"):
        report = run_job(job)
    assert all(block["recon_kept"] is False for block in report["blocks"])
    assert caplog.text.count("cycle 2: repair undone") == len(report["blocks"])


def test_no_held_out_samples_means_no_guard(tiny_model_dir, small_calib_file, tmp_path):
    report = run_job(_guarded_job(tiny_model_dir, small_calib_file, tmp_path / "out", val_fraction=0.0, steps=2))
    assert all(block["recon_kept"] is None and block["val_before"] is None for block in report["blocks"])


def test_everything_split_trains_on_all_samples():
    split = SampleSplit.everything(5)
    assert split.train.tolist() == [0, 1, 2, 3, 4] and split.val.numel() == 0
