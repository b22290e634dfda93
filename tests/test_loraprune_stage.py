"""``run --pruner loraprune --loraprune-objective model``: the model-level stage in the engine, end to end.

In-process runs on the tiny LLaMA (grouped-query attention: 4 query heads, 2 key/value heads) check
the exact pattern of the written blocks; subprocess runs killed at chosen instants check that a
resume writes the same bytes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_job
from reconstruct.jobs.run_job import run_job
from reconstruct.methods import ReconSpec
from reconstruct.modelio.output import STATE_DIR
from reconstruct.state.manifest import Manifest
from test_resume import Job, assert_same_output, computed_blocks, crashed, ok, refused

SCHEDULE_EARLY = True  # conftest: many whole jobs, so this module starts first
STEPS = 6
MODEL_LEVEL = {"loraprune_objective": "model", "loraprune_steps": STEPS, "loraprune_lr": 1e-3}


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def model_level_job(model, out, calib, pattern, sparsity, recon=None):
    job = make_job(model, out, "loraprune", pattern, sparsity, calib=calib, n_samples=4, seq_len=32, recon=recon)
    return dataclasses.replace(job, prune=dataclasses.replace(job.prune, **MODEL_LEVEL))


def block_weights(out, index: int) -> dict[str, torch.Tensor]:
    """The written linears of block ``index`` (the tiny LLaMA's shard per block), (out, in)."""
    shard = sorted(path for path in out.glob("model-*.safetensors"))[index]
    prefix = f"model.layers.{index}."
    return {key[len(prefix):-len(".weight")]: value for key, value in load_file(shard).items()
            if key.startswith(prefix) and key.endswith("_proj.weight")}


@pytest.mark.figures  # loraprune.png
@pytest.mark.parametrize(("pattern", "sparsity"), [("unstructured", 0.5), ("2:4", None), ("heads", 0.5),
                                                   ("channels", 0.25)])
def test_the_written_blocks_are_exactly_the_stage_masks_at_the_target(tiny_model_dir, small_calib_file, tmp_path,
                                                                      pattern, sparsity):
    out = tmp_path / "out"
    report = run_job(model_level_job(tiny_model_dir("llama"), out, small_calib_file, pattern, sparsity))
    stage = report["loraprune"]
    assert [event["fraction"] for event in stage["history"]][-1] == 1.0 and len(stage["loss_curve"]) == STEPS
    assert "## Model-level LoRAPrune" in (out / "report.md").read_text() and (out / "loraprune.png").is_file()
    for index, block in enumerate(report["blocks"]):
        masks = load_file(out / STATE_DIR / "loraprune" / stage["files"][str(index)]["file"])
        weights = block_weights(out, index)
        for name, weight in weights.items():
            assert (weight != 0).equal(masks[name]), f"block {index} {name}: zeros are not the stage's mask"
        if pattern == "unstructured":
            assert set(block["sparsity"].values()) == {0.5}
        elif pattern == "2:4":
            for weight in weights.values():
                assert (weight.reshape(weight.shape[0], -1, 4) != 0).sum(dim=2).eq(2).all()
        elif pattern == "heads":  # 2 of 4 query heads; a kv head (2 query heads each) only with both
            removed = set(block["removed"]["heads"])
            assert len(removed) == 2
            assert block["removed"]["kv_heads"] == [kv for kv in range(2) if {2 * kv, 2 * kv + 1} <= removed]
        else:
            assert len(block["removed"]["channels"]) == 32  # 0.25 of 128


@pytest.mark.parametrize(("pattern", "sparsity"), [("unstructured", 0.5), ("heads", 0.5)])
def test_streamed_and_resident_stages_choose_the_same_masks(tiny_model_dir, small_calib_file, tmp_path, monkeypatch,
                                                            pattern, sparsity):
    """The streamed trainer (blocks loaded twice a step, masks at each load) against the resident one
    (loaded once, masks moved at step_done). Their gradients agree to rounding, and the masks compare
    scores that are far from tied on this model, so the masks must be equal."""
    import reconstruct.jobs.loraprune_stage as stage

    masks = {}
    for streamed in (False, True):
        monkeypatch.setattr(stage, "choose_stream", lambda spec, loaded, value=streamed: value)
        out = tmp_path / f"streamed-{streamed}"
        report = run_job(model_level_job(tiny_model_dir("llama"), out, small_calib_file, pattern, sparsity))
        assert report["loraprune"]["streamed"] == streamed
        masks[streamed] = [load_file(out / STATE_DIR / "loraprune" / f"masks-{i:05d}.safetensors")
                           for i in range(len(report["blocks"]))]
    for resident, streamed in zip(masks[False], masks[True]):
        assert resident.keys() == streamed.keys() and all(resident[k].equal(streamed[k]) for k in resident)


def test_reconstruction_after_the_stage_keeps_every_zero(tiny_model_dir, small_calib_file, tmp_path):
    out = tmp_path / "out"
    recon = ReconSpec(method="masklora", steps=3)
    report = run_job(model_level_job(tiny_model_dir("llama"), out, small_calib_file, "unstructured", 0.5, recon))
    for index in range(len(report["blocks"])):
        masks = load_file(out / STATE_DIR / "loraprune" / f"masks-{index:05d}.safetensors")
        for name, weight in block_weights(out, index).items():
            assert (weight != 0).equal(masks[name])
    assert report["blocks"][0]["mse_after"] is not None


# --------------------------------------------------------------------------- resume, through the CLI
FLAGS = {"pruner": "loraprune", "loraprune_objective": "model", "loraprune_steps": str(STEPS),
         "loraprune_lr": "1e-3", "n_samples": "4"}


@pytest.fixture(scope="module")
def cli_job(tiny_model_dir, small_calib_file) -> Job:
    return Job(tiny_model_dir("llama"), small_calib_file)


@pytest.fixture(scope="module")
def reference(cli_job, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    ok(cli_job.run(out, fresh=True, **FLAGS))  # the other side of each comparison is forked (forked_cli)
    return out


# (crash point, steps the resumed stage starts after: None = the stage was recorded, not trained again).
# Every step checkpoints here (--checkpoint-every 1): the controller's state of step s is saved in
# step_done, then the trainer's; a kill in between resumes from the trainer's step s - 1.
STAGE_CRASHES = [("loraprune-step:3", 2), ("retrain-step:4", 3), ("loraprune-masks", STEPS), ("write:{shard1}", None)]


@pytest.mark.parametrize(("point", "resumed_after"), STAGE_CRASHES, ids=[case[0] for case in STAGE_CRASHES])
def test_a_killed_stage_or_loop_resumes_to_the_same_bytes(cli_job, reference, tmp_path, point, resumed_after):
    out = tmp_path / "out"
    crashed(cli_job.run(out, crash=point.format(shard1=cli_job.shard(1)), **FLAGS))
    assert (Manifest.load(out).loraprune is not None) == (resumed_after is None)
    resumed = ok(cli_job.run(out, **FLAGS))
    trained_again = "steps of LoRA" in resumed.stderr
    assert trained_again == (resumed_after is not None), resumed.stderr[-3000:]
    if resumed_after is not None:
        assert f"resuming after step {resumed_after}" in resumed.stderr
    assert computed_blocks(resumed)[-1] == cli_job.n_blocks - 1
    assert_same_output(out, reference)
    assert not list((out / STATE_DIR / "loraprune").glob("*checkpoint*"))  # the stage's checkpoints are gone


def test_a_killed_heads_stage_resumes_its_group_averages(cli_job, tmp_path):
    """Heads keep their moving averages in host memory: they come back from the controller's checkpoint file."""
    flags = {**FLAGS, "pattern": "heads", "sparsity": "0.5"}
    reference = tmp_path / "reference"
    ok(cli_job.run(reference, fresh=True, **flags))
    out = tmp_path / "out"
    crashed(cli_job.run(out, crash="retrain-step:4", **flags))
    resumed = ok(cli_job.run(out, **flags))
    assert "resuming after step 3" in resumed.stderr
    assert_same_output(out, reference)


def test_a_different_objective_on_the_same_out_is_refused(cli_job, reference, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(reference, out)
    line = refused(cli_job.run(out, **{**FLAGS, "loraprune_objective": "block"}))
    assert "--loraprune-objective" in line


def test_cycles_with_the_model_objective_is_refused(cli_job, tmp_path):
    line = refused(cli_job.run(tmp_path / "out", **{**FLAGS, "cycles": "2"}))
    assert "--cycles" in line and "--loraprune-objective model" in line
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_a_stage_that_cannot_fit_is_refused_before_anything_is_written(tiny_model_dir, small_calib_file, tmp_path,
                                                                       monkeypatch):
    import reconstruct.retrain.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 1024)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="--loraprune-objective model: the LoRA training needs about .*--batch-size"):
        run_job(model_level_job(tiny_model_dir("llama"), out, small_calib_file, "unstructured", 0.5))
    assert not out.exists() or not any(out.iterdir())


def test_the_stage_holds_one_block_of_final_masks_at_a_time(tiny_model_dir, small_calib_file, tmp_path, monkeypatch):
    """Per-weight final masks are a byte per weight: writing them must not hold every block's at once
    (host memory would grow with depth)."""
    import weakref

    from pruners.loraprune_model import LoRAPruneController
    from reconstruct.jobs import loraprune_stage

    alive, most = [0], [0]
    real_final, real_save = LoRAPruneController.final_masks, loraprune_stage.save_safetensors_atomic

    def final_masks(self, index):
        masks = real_final(self, index)
        alive[0] += 1
        weakref.finalize(next(iter(masks.values())), lambda: alive.__setitem__(0, alive[0] - 1))
        return masks

    def save(path, tensors, *args, **kwargs):
        most[0] = max(most[0], alive[0])
        return real_save(path, tensors, *args, **kwargs)

    monkeypatch.setattr(LoRAPruneController, "final_masks", final_masks)
    monkeypatch.setattr(loraprune_stage, "save_safetensors_atomic", save)
    run_job(model_level_job(tiny_model_dir("llama"), tmp_path / "out", small_calib_file, "unstructured", 0.5))
    assert most[0] == 1


def test_a_mask_file_changed_before_the_resume_stops_the_job(cli_job, tmp_path):
    """The loop prunes with the stage's stored masks only if their bytes are the ones the stage recorded."""
    from safetensors.torch import save_file

    out = tmp_path / "out"
    crashed(cli_job.run(out, crash=f"write:{cli_job.shard(1)}", **FLAGS))
    mask_file = out / STATE_DIR / "loraprune" / "masks-00001.safetensors"
    masks = load_file(mask_file)
    save_file({name: ~mask for name, mask in masks.items()}, mask_file)  # valid file, other masks
    resumed = cli_job.run(out, **FLAGS)
    assert resumed.returncode not in (0, -9), resumed.stderr[-3000:]
    assert "block 1" in resumed.stderr and "sha256 mismatch" in resumed.stderr
    assert (out / cli_job.shard(0)).is_file()  # what was written before stays
