"""``--model-check``: after the loop, the repaired model against the same model without its repairs.

Tiny LLaMA (3 blocks), 8 calibration windows of 32 tokens, 4 judge windows. A repair made to hurt:
MaskLoRA as usual, then Gaussian noise of standard deviation 1 added to every kept weight (the
tiny model's weights have a standard deviation of 0.02), pruned weights left at zero; the
per-block guard is off so the hurt block reaches the model. The whole-model judge must revert it.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_job
from reconstruct.jobs import model_check_stage, run_job as run_job_module
from reconstruct.jobs.run_job import run_job
from reconstruct.loop.pipeline import BlockPipeline
from reconstruct.methods import ReconSpec
from reconstruct.modelio.folder_layout import MANIFEST_NAME, STATE_DIR, UNREPAIRED_DIR
from reconstruct.modelio.output import shard_name
from reconstruct.state import model_check_record

N_BLOCKS = 3  # the tiny LLaMA's
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def check_job(tiny_model_dir, out, method="masklora", model_check="auto", calib=None):
    """A tiny wanda + ``method`` job with the guard off (so a hurting repair reaches the model)."""
    recon = ReconSpec(method=method, steps=4, guard=False)
    job = make_job(tiny_model_dir("llama"), out, "wanda", sparsity=0.5, recon=recon,
                   **({"calib": calib} if calib is not None else {}))
    return replace(job, model_check=model_check, model_check_samples=4)


@pytest.fixture
def hurting_repair(monkeypatch):
    """Every block's repair is followed by seeded noise on its kept weights (zeros stay zeros)."""
    real = BlockPipeline._reconstruct

    def hurt(self, ctx):
        real(self, ctx)
        generator = torch.Generator().manual_seed(ctx.index)
        with torch.no_grad():
            for name, module in ctx.linears.items():
                noise = torch.randn(module.weight.shape, generator=generator)  # (out, in)
                module.weight.add_(noise * ctx.keep_masks[name].to(noise.dtype))

    monkeypatch.setattr(BlockPipeline, "_reconstruct", hurt)


def shards(out):
    return {index: load_file(out / shard_name(index, N_BLOCKS + 1)) for index in range(N_BLOCKS)}


def spy_unrepaired(monkeypatch) -> dict[int, dict[str, torch.Tensor]]:
    """Copies of what the loop saves as each block's tensors before its repair."""
    saved: dict[int, dict[str, torch.Tensor]] = {}
    real = run_job_module.save_unrepaired

    def spy(out, index, tensors):
        saved[index] = {name: value.clone() for name, value in tensors.items()}
        real(out, index, tensors)

    monkeypatch.setattr(run_job_module, "save_unrepaired", spy)
    return saved


def test_a_hurting_repair_is_reverted_to_the_saved_unrepaired_tensors(tiny_model_dir, tmp_path, monkeypatch,
                                                                     hurting_repair):
    saved = spy_unrepaired(monkeypatch)
    job = check_job(tiny_model_dir, tmp_path / "out")
    report = run_job(job)
    check = report["model_check"]
    assert check["decision"] == "reverted"
    assert not check["repaired_loss"] <= check["unrepaired_loss"]
    assert check["windows"] == 4 and check["seq_len"] == 32 and check["text"].startswith("self")
    assert sorted(saved) == list(range(N_BLOCKS))
    written = shards(job.out)
    for index, before in saved.items():
        assert before, f"block {index}: MaskLoRA changed no tensor"
        for name, value in before.items():  # bitwise: the output holds the saved tensors
            assert torch.equal(written[index][name], value), name
    text = (job.out / "report.md").read_text()
    assert "reverted" in text and f"{check['repaired_loss']:.4f}" in text and f"{check['unrepaired_loss']:.4f}" in text
    assert json.loads((job.out / "reconstruct.json").read_text())["model_check"]["decision"] == "reverted"
    assert not (job.out / STATE_DIR / UNREPAIRED_DIR).exists()  # removed once the decision is carried out


def test_zeros_survive_a_revert(tiny_model_dir, tmp_path, hurting_repair):
    job = check_job(tiny_model_dir, tmp_path / "out")
    report = run_job(job)
    assert report["model_check"]["decision"] == "reverted"
    written = shards(job.out)
    for index, block in enumerate(report["blocks"]):
        for linear in LINEARS:
            weight = written[index][f"model.layers.{index}.{linear}.weight"]
            # the repaired block's stored sparsity, measured with the same expression (exact counts)
            assert float((weight == 0).sum().item() / weight.numel()) == block["sparsity"][linear]
            assert block["sparsity"][linear] >= 0.5


def test_the_decision_matches_the_recorded_losses(tiny_model_dir, tmp_path):
    report = run_job(check_job(tiny_model_dir, tmp_path / "out", method="bias-ln"))
    check = report["model_check"]
    expected = "kept" if check["repaired_loss"] <= check["unrepaired_loss"] else "reverted"
    assert check["decision"] == expected
    assert "python-stdlib" not in check["text"]  # a text --calib: judged on self windows


def test_self_calibration_is_judged_on_python_source(tiny_model_dir, tmp_path):
    report = run_job(check_job(tiny_model_dir, tmp_path / "out", calib="self"))
    assert report["model_check"]["text"].startswith("python-stdlib")


def test_off_is_the_old_code_path(tiny_model_dir, tmp_path, monkeypatch):
    saved = spy_unrepaired(monkeypatch)
    off = check_job(tiny_model_dir, tmp_path / "off", model_check="off")
    report = run_job(off)
    assert "model_check" not in report and "model_check" not in report["job"] and not saved
    assert not (off.out / STATE_DIR / "model-check.json").exists()
    # the check's side of the loop (the saved copies) leaves the shards as the old path writes them
    monkeypatch.setattr(model_check_stage, "judge_losses", lambda *args: (1.0, 2.0))
    on = check_job(tiny_model_dir, tmp_path / "on")
    assert run_job(on)["model_check"]["decision"] == "kept" and saved
    for index in range(N_BLOCKS + 1):
        name = shard_name(index, N_BLOCKS + 1)
        assert (off.out / name).read_bytes() == (on.out / name).read_bytes(), name


def test_an_old_job_resumes_without_the_check_and_an_explicit_text_is_refused(tiny_model_dir, tmp_path):
    off = check_job(tiny_model_dir, tmp_path / "out", model_check="off")
    run_job(off)
    again = run_job(replace(off, model_check="auto"))  # a folder made before the check existed looks like this
    assert again["already_finished"] and "model_check" not in again
    with pytest.raises(ValueError, match="--model-check"):
        run_job(replace(off, model_check="self"))


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("point", ["model-check-decided", "model-check-staged", "model-check-swap:"])
def test_a_revert_interrupted_is_finished_on_resume(tiny_model_dir, tmp_path, monkeypatch, hurting_repair, point):
    reference = check_job(tiny_model_dir, tmp_path / "reference")
    assert run_job(reference)["model_check"]["decision"] == "reverted"

    def crash(name):
        if name.startswith(point):
            raise Interrupted(name)

    for module in (model_check_stage, model_check_record):
        monkeypatch.setattr(module, "crash_point", crash)
    job = replace(reference, out=tmp_path / "out")
    with pytest.raises(Interrupted):
        run_job(job)
    assert not json.loads((job.out / MANIFEST_NAME).read_text())["finished"]
    for module in (model_check_stage, model_check_record):
        monkeypatch.setattr(module, "crash_point", lambda name: None)
    report = run_job(job)
    assert report["model_check"]["decision"] == "reverted"
    for index in range(N_BLOCKS + 1):
        name = shard_name(index, N_BLOCKS + 1)
        assert (job.out / name).read_bytes() == (reference.out / name).read_bytes(), name
    assert run_job(job)["already_finished"]  # the manifest records the reverted shards


def test_a_damaged_block_of_a_reverted_job_is_computed_and_reverted_again(tiny_model_dir, tmp_path, hurting_repair):
    reference = check_job(tiny_model_dir, tmp_path / "reference")
    assert run_job(reference)["model_check"]["decision"] == "reverted"
    job = replace(reference, out=tmp_path / "out")
    run_job(job)
    damaged = job.out / shard_name(1, N_BLOCKS + 1)
    data = bytearray(damaged.read_bytes())
    data[-64] ^= 0xFF
    damaged.write_bytes(bytes(data))
    assert run_job(job)["model_check"]["decision"] == "reverted"
    for index in range(N_BLOCKS + 1):
        name = shard_name(index, N_BLOCKS + 1)
        assert (job.out / name).read_bytes() == (reference.out / name).read_bytes(), name
