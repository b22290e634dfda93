"""``--recon-val-data``: windows of another text travel as extra stream rows and judge each repair.

They never train, never feed the pruner (statistics, OWL, LoRAPrune's warm-up) and never enter the
reported block error, so a job with them writes the bytes of ``--recon-val 0`` when the guard keeps
every repair; the guard decides on them; a resume is byte-identical; bad input exits 2.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import cli
from reconstruct.cli import parse_args
from reconstruct.cli.job_options import SWEEP_SHARED, build_job, relaunch_command
from reconstruct.cli.options import command_line
from test_distributed import _run  # run_job, interrupted at a crash point; returns the block it started from
from conftest import WIKITEXT_TEST, make_job, write_text_head
from reconstruct.config import ValidationData
from reconstruct.jobs.run_job import run_job
from reconstruct.methods import ReconSpec
from reconstruct.methods.samples import SampleSplit
from reconstruct.parallel import distributed
from reconstruct.reporting.status import describe_job

DIVERGING_LR = 50.0  # as in test_recon_guard.py: every trained bias / norm weight moves by ~50 a step
VAL_TEXT_CHARS = 20_000  # enough WikiText-2 *test* text for a few 32-token windows


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def val_text(tmp_path_factory) -> Path:
    """Text of another part of the corpus (the test split) than the calibration text (the valid split)."""
    return write_text_head(WIKITEXT_TEST, VAL_TEXT_CHARS, tmp_path_factory.mktemp("val") / "test-head.txt")


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(out.glob("model-*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _assert_same_bytes(got: Path, want: Path) -> None:
    a, b = _tensors(got), _tensors(want)
    assert a.keys() == b.keys() and a
    for name in b:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def _job(model: Path, calib: Path, out: Path, *, pruner: str = "wanda", val: ValidationData | None = None,
         n_samples: int = 6, **recon):
    """Tiny LLaMA, ``n_samples`` × 32 tokens, micro-batch 4 (6 samples: the last micro-batch is partial)."""
    spec = ReconSpec(**{"method": "bias-ln", "steps": 8, "val_fraction": 0.0, **recon})
    job = make_job(model, out, pruner, sparsity=0.5, calib=calib, n_samples=n_samples, recon=spec)
    return replace(job, recon_val_data=val)


# --------------------------------------------------------------------------- the split
def test_validation_rows_follow_the_calibration_rows_and_never_train():
    split = SampleSplit.with_validation_text(5, 3)
    assert torch.equal(split.train, SampleSplit.everything(5).train)  # the draw of --recon-val 0
    assert split.val.tolist() == [5, 6, 7] and split.calibration.tolist() == [0, 1, 2, 3, 4]
    assert split.extra_rows and not SampleSplit.everything(5).extra_rows


def test_each_rank_s_calibration_rows_are_a_prefix_of_its_rows(monkeypatch):
    split = SampleSplit.with_validation_text(5, 3)  # 8 rows: rank 0 holds 0-3, rank 1 holds 4-7
    prefixes = []
    for rank in range(2):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: distributed.World(rank, 2))
        prefixes.append(split.calibration_rows(distributed.split_samples(8)).tolist())
    assert prefixes == [[0, 1, 2, 3], [0]]  # rank 1: its first row is calibration sample 4, then validation rows


# --------------------------------------------------------------------------- training is unchanged
CASES = {  # name → (pruner, extra ReconSpec fields, prune-spec fields)
    "wanda": ("wanda", {}, {}),
    "sparsegpt-sublayer": ("sparsegpt", {"granularity": "sublayer"}, {}),  # the dense-copy objective
    "loraprune": ("loraprune", {}, {"loraprune_steps": 4}),  # block training of the pruner
    "owl": ("wanda", {}, {"allocation": "owl"}),  # the allocation pre-pass
}


@pytest.mark.parametrize("name", list(CASES))
def test_validation_rows_change_nothing_that_is_written(name, tiny_model_dir, small_calib_file, val_text, tmp_path):
    from reconstruct.config import AllocationSpec

    pruner, recon, prune = CASES[name]
    model = tiny_model_dir("llama")
    if "allocation" in prune:
        prune = {**prune, "allocation": AllocationSpec.parse(prune["allocation"])}
    jobs = {}
    for label, val in (("plain", None), ("val", ValidationData(str(val_text), 3))):
        job = _job(model, small_calib_file, tmp_path / label, pruner=pruner, val=val, guard=False, **recon)
        jobs[label] = replace(job, prune=replace(job.prune, **prune))
    plain, with_val = run_job(jobs["plain"]), run_job(jobs["val"])
    _assert_same_bytes(tmp_path / "val", tmp_path / "plain")
    for mine, theirs in zip(with_val["blocks"], plain["blocks"]):
        assert (mine["mse_before"], mine["mse_after"]) == (theirs["mse_before"], theirs["mse_after"])  # same rows
        assert mine["sparsity"] == theirs["sparsity"]
        assert theirs["val_before"] is None and mine["val_before"] is not None and mine["val_after"] is not None
    assert with_val["job"]["validation"] == {"source": {"file": val_text.name, "sha256": mock.ANY}, "n_samples": 3}
    assert "validation" not in plain["job"]  # a job without the flag keeps its fingerprint


# --------------------------------------------------------------------------- the guard decides on them
def test_the_guard_undoes_a_repair_the_validation_rows_reject(tiny_model_dir, small_calib_file, val_text, tmp_path):
    model = tiny_model_dir("llama")
    run_job(_job(model, small_calib_file, tmp_path / "none", method="none"))
    report = run_job(_job(model, small_calib_file, tmp_path / "out", val=ValidationData(str(val_text), 2),
                          lr=DIVERGING_LR))
    for block in report["blocks"]:
        assert block["recon_kept"] is False and block["recon_stopped_at"] == 0
        assert block["val_after"] >= block["val_before"]
    # the pruned model bit for bit, plus the zero biases bias-ln's config flags promise in every block
    got, want = _tensors(tmp_path / "out"), _tensors(tmp_path / "none")
    assert all(torch.equal(got[name], want[name]) for name in want)
    added = set(got) - set(want)
    assert added and all(name.endswith(".bias") and not got[name].any() for name in added)
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "2 windows of test-head.txt (`--recon-val-data`" in markdown
    assert "no better on --recon-val-data" in markdown


def test_the_guard_measures_the_validation_rows_not_held_out_calibration(tiny_model_dir, small_calib_file, val_text,
                                                                        tmp_path):
    """The same text as calibration and as validation gives other rows (own seed), and other errors."""
    model = tiny_model_dir("llama")
    held_out = run_job(_job(model, small_calib_file, tmp_path / "held", val_fraction=0.2))
    text = run_job(_job(model, small_calib_file, tmp_path / "text", val=ValidationData(str(val_text), 2)))
    for block in text["blocks"]:
        assert block["recon_kept"] == (block["val_after"] < block["val_before"])
    assert text["blocks"][0]["val_before"] != held_out["blocks"][0]["val_before"]
    tokens = load_file(tmp_path / "text" / ".reconstruct" / "validation-tokens.safetensors")["tokens"]
    calibration = load_file(tmp_path / "text" / ".reconstruct" / "calibration-tokens.safetensors")["tokens"]
    assert tokens.shape == (2, calibration.shape[1])


def test_self_sampled_validation_windows(tiny_model_dir, small_calib_file, tmp_path):
    model = tiny_model_dir("llama")
    report = run_job(_job(model, small_calib_file, tmp_path / "out", val=ValidationData("self", 2), steps=2))
    assert report["job"]["validation"] == {"source": {"name": "self"}, "n_samples": 2}
    assert all(block["val_before"] is not None for block in report["blocks"])


# --------------------------------------------------------------------------- resume
def test_resume_is_byte_identical_and_refuses_another_validation_text(tiny_model_dir, small_calib_file, val_text,
                                                                     tmp_path):
    model = tiny_model_dir("llama")
    val = ValidationData(str(val_text), 3)
    assert _run(_job(model, small_calib_file, tmp_path / "whole", val=val)) == 0
    resumed = _job(model, small_calib_file, tmp_path / "resumed", val=val)
    assert _run(resumed, "reconstruction:2") == 0
    assert _run(resumed) == 2  # from the activation checkpoint after block 2 (its rows: 6 + 3)
    _assert_same_bytes(tmp_path / "resumed", tmp_path / "whole")
    assert f"validate:   {val_text.name}, 3 windows (--recon-val-data)" in describe_job(tmp_path / "resumed")
    for other, flag in ((ValidationData("self", 3), "--recon-val-data"), (ValidationData(str(val_text), 2),
                        "--recon-val-samples"), (None, "--recon-val-data")):
        with pytest.raises(ValueError) as refused:
            run_job(_job(model, small_calib_file, tmp_path / "resumed", val=other))
        assert flag in str(refused.value)


# --------------------------------------------------------------------------- the planner
def test_the_plan_counts_the_validation_rows(tiny_model_dir, small_calib_file, val_text, tmp_path):
    from reconstruct.planner import plan_from_config

    model = tiny_model_dir("llama")
    plain = plan_from_config(_job(model, small_calib_file, tmp_path / "a", n_samples=8), None)
    with_val = plan_from_config(_job(model, small_calib_file, tmp_path / "b", n_samples=8,
                                     val=ValidationData(str(val_text), 4)), None)
    assert with_val.sizes["stream"] * 8 == plain.sizes["stream"] * 12


# --------------------------------------------------------------------------- the command line
def test_the_flags_build_the_job(tiny_model_dir, val_text, tmp_path):
    common = ["--n-samples", "20", "--out", str(tmp_path / "o"), "--model", str(tiny_model_dir("llama"))]
    params = parse_args("run", ["--recon-val-data", str(val_text), *common])
    job = build_job(params)
    assert job.recon_val_data == ValidationData(str(val_text), 2)  # max(1, 20 // 8)
    assert job.recon.val_fraction == 0.0  # every calibration sample trains
    assert build_job(parse_args("run", common)).recon_val_data is None
    assert "--recon-val-data" in relaunch_command(params) and "--recon-val-data" in command_line(SWEEP_SHARED, params)


@pytest.mark.parametrize(("flags", "message"), [
    (["--recon-val-data", "{empty}"], "--recon-val-data {empty}: the file holds no text"),
    (["--recon-val-data", "{missing}"], "--recon-val-data {missing}: no such file"),
    (["--recon-val-data", "nosuchdataset"], "--recon-val-data nosuchdataset: no such file"),
    (["--recon-val-data", "self", "--method", "none"], "needs a --method other than none"),
    (["--recon-val-samples", "4"], "give --recon-val-data too"),
    (["--recon-val-data", "self", "--recon-val", "0.25"], "drop --recon-val"),
    (["--recon-val-data", "self", "--recon-val-samples", "0"], "--recon-val-samples"),
])
def test_bad_validation_data_exits_2_naming_the_flag(flags, message, tiny_model_dir, tmp_path):
    empty, missing = tmp_path / "empty.txt", tmp_path / "missing.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    names = {"empty": str(empty), "missing": str(missing)}
    flags = [flag.format(**names) for flag in flags]
    out = tmp_path / "o"
    result = CliRunner().invoke(cli.app, ["run", "--model", str(tiny_model_dir("llama")), "--out", str(out),
                                          "--device", "cpu", "--n-samples", "4", "--seq-len", "32", *flags])
    assert result.exit_code == 2, result.output
    assert message.format(**names) in " ".join(result.output.split())
    assert not out.exists()


def test_plan_refuses_bad_validation_data_too(tmp_path):
    result = CliRunner().invoke(cli.app, ["plan", "--recon-val-data", str(tmp_path / "missing.txt")])
    assert result.exit_code == 2 and "--recon-val-data" in result.output
