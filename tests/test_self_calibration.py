"""``--calib self``: calibration sequences sampled from the dense model, seeded, no data needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli import app
from conftest import VOCAB_SIZE, make_job
from reconstruct.jobs.run_job import run_job

N_SAMPLES, SEQ_LEN = 4, 16
TOKENS_FILE = Path(".reconstruct") / "calibration-tokens.safetensors"


def saved_tokens(out: Path) -> torch.Tensor:
    return load_file(out / TOKENS_FILE)["tokens"]


def block_shards(out: Path) -> dict[str, bytes]:
    """Bytes of every block shard (all shards but the last, which holds the tensors outside the blocks)."""
    files = sorted(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()))
    return {name: (out / name).read_bytes() for name in files[:-1]}


@pytest.fixture(scope="module")
def self_calibrated(tiny_model_dir, tmp_path_factory):
    """Three llama jobs on ``--calib self``: seed 0 in-process, seed 0 through the CLI, seed 1 in-process."""
    model = tiny_model_dir("llama")
    root = tmp_path_factory.mktemp("self-calib")
    outs = {"seed0": root / "seed0", "seed0-cli": root / "seed0-cli", "seed1": root / "seed1"}

    torch.manual_seed(123)  # the global RNG state must not matter
    run_job(make_job(model, outs["seed0"], "wanda", calib="self", n_samples=N_SAMPLES, seq_len=SEQ_LEN, seed=0))
    torch.manual_seed(456)
    result = CliRunner().invoke(app, [
        "run", "--model", str(model), "--out", str(outs["seed0-cli"]), "--pruner", "wanda", "--calib", "self",
        "--n-samples", str(N_SAMPLES), "--seq-len", str(SEQ_LEN), "--seed", "0", "--micro-batch", "4",
        "--device", "cpu", "--method", "none",
    ])
    assert result.exit_code == 0, result.output
    run_job(make_job(model, outs["seed1"], "wanda", calib="self", n_samples=N_SAMPLES, seq_len=SEQ_LEN, seed=1))
    return outs


def test_saved_tokens_have_shape_n_by_t_and_valid_ids(self_calibrated):
    for out in self_calibrated.values():
        tokens = saved_tokens(out)
        assert tokens.shape == (N_SAMPLES, SEQ_LEN)
        assert tokens.dtype == torch.int64
        assert int(tokens.min()) >= 0 and int(tokens.max()) < VOCAB_SIZE
        assert len({tuple(row.tolist()) for row in tokens}) == N_SAMPLES  # sampled, not one repeated sequence


def test_same_seed_gives_same_tokens_and_output_other_seed_differs(self_calibrated):
    first, again, other = (saved_tokens(self_calibrated[k]) for k in ("seed0", "seed0-cli", "seed1"))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert block_shards(self_calibrated["seed0"]) == block_shards(self_calibrated["seed0-cli"])
    assert block_shards(self_calibrated["seed0"]) != block_shards(self_calibrated["seed1"])


def test_self_calibrated_job_completes(self_calibrated):
    from transformers import AutoModelForCausalLM

    for out in self_calibrated.values():
        report = json.loads((out / "reconstruct.json").read_text())
        assert report["job"]["calibration"]["source"] == {"name": "self"}
        assert report["job"]["calibration"]["n_samples"] == N_SAMPLES
        assert len(report["blocks"]) == 3
        # every row keeps exactly half of an even width: each fraction is 0.5 and so is their mean, exactly
        assert report["mean_linear_sparsity"] == 0.5
        assert json.loads((out / "reconstruct-manifest.json").read_text())["finished"] is True
    model = AutoModelForCausalLM.from_pretrained(self_calibrated["seed0"]).eval()
    with torch.no_grad():
        logits = model(input_ids=saved_tokens(self_calibrated["seed0"])).logits  # (n, T, V)
    assert torch.isfinite(logits).all()


# --------------------------------------------------------------------------- Ctrl-C keeps what was sampled
def interrupt_after(checkpoints: int, monkeypatch):
    """Make the sampling checkpoint raise KeyboardInterrupt after it saved ``checkpoints`` times."""
    from reconstruct.jobs import calibration_tokens as job_state

    real, saved = job_state.save_sampling, []

    def save_then_interrupt(*args, **kwargs):
        real(*args, **kwargs)
        saved.append(args[1].tokens_done())
        if len(saved) == checkpoints:
            raise KeyboardInterrupt

    monkeypatch.setattr(job_state, "save_sampling", save_then_interrupt)
    return saved


def test_interrupted_self_calibration_continues_where_it_stopped(tiny_model_dir, tmp_path, monkeypatch):
    from calib import self_generated
    from reconstruct.reporting.status import describe_job

    model = tiny_model_dir("llama")
    args = ["run", "--model", str(model), "--pruner", "wanda", "--calib", "self", "--n-samples", "3",
            "--seq-len", "17", "--seed", "0", "--batch-size", "4", "--device", "cpu", "--method", "none"]
    whole = tmp_path / "whole"
    assert CliRunner().invoke(app, [*args, "--out", str(whole)]).exit_code == 0

    out = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        saved = interrupt_after(3, patch)
        stopped = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert stopped.exit_code == 130, stopped.output
    total = 3 * 16
    assert saved == [6, 12, 18]  # 3 sequences x 2 new tokens per chunk (16 new tokens in 8 chunks)
    assert f"self-calibration: 18 of {total} tokens sampled" in stopped.stderr, stopped.stderr
    status = describe_job(out)
    assert f"sampling:   self-calibration: 18 of {total} tokens sampled" in status, status
    assert "interrupted while sampling" in status

    resumed_at = []
    real_generate = self_generated.generate_self_calibration

    def spy(*a, resume=None, **k):
        resumed_at.append(resume.tokens_done() if resume is not None else 0)
        return real_generate(*a, resume=resume, **k)

    monkeypatch.setattr("reconstruct.jobs.calibration_tokens.generate_self_calibration", spy)
    rerun = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert rerun.exit_code == 0, rerun.output
    assert resumed_at == [18]
    assert torch.equal(saved_tokens(out), saved_tokens(whole))  # the same tokens as a run never interrupted
    assert block_shards(out) == block_shards(whole)
    assert not list((out / ".reconstruct").glob("*.partial.safetensors"))
