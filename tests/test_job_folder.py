"""The job-folder toolkit (``state.job_folder``) and the model-folder writer (``modelio.output``), shared by
``run``, ``retrain`` and ``shrink``: one refusal of a foreign ``--out``, one same-job check naming flags,
one record layout per kind (compatible with folders written before), one index built from shard headers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reconstruct.atomic import TEMP_SUFFIX, save_safetensors_atomic
from reconstruct.flags import flag_names, flag_of
from reconstruct.jobs.retrain_job import RETRAIN_FINGERPRINT_FLAGS
from reconstruct.jobs.run_fingerprint import RUN_FINGERPRINT_FLAGS
from reconstruct.methods.spec import ReconSpec
from reconstruct.modelio.folder_layout import INDEX_NAME, LOCK_NAME, STATE_DIR
from reconstruct.modelio.output import ModelFolderWriter, config_with_bias_flags, index_from_headers
from reconstruct.retrain.spec import RetrainSpec
from reconstruct.shrink import SHRINK_FINGERPRINT_FLAGS
from reconstruct.state.fingerprint import hash_text_source, text_source_identity
from reconstruct.state.job_diff import flag_of_field
from reconstruct.state.job_folder import RETRAIN_JOB, RUN_JOB, SHRINK_JOB, JobFolder, JobRecord

KINDS = {"run": (RUN_JOB, "reconstruct job"), "retrain": (RETRAIN_JOB, "retraining job"),
         "shrink": (SHRINK_JOB, "shrunk model")}


# --------------------------------------------------------------------------- the foreign-folder refusal
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_refuses_a_foreign_out_alike(tmp_path, kind):
    job_kind, noun = KINDS[kind]
    out = tmp_path / "out"
    JobFolder(out, job_kind).refuse_foreign()  # not there yet: fine, nothing created
    assert not out.exists()
    out.mkdir()
    for leftover in (LOCK_NAME, f".x{TEMP_SUFFIX}"):  # what a killed job leaves before its record
        (out / leftover).write_text("")
    (out / STATE_DIR).mkdir()
    JobFolder(out, job_kind).refuse_foreign()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=rf"holds no {noun}; choose an empty or new folder \(nothing there was changed\)"):
        JobFolder(out, job_kind).refuse_foreign()
    record = JobFolder(out, job_kind).record_path
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text("{}")
    JobFolder(out, job_kind).refuse_foreign()  # its own job: the same-job check decides
    with pytest.raises(ValueError, match="is a file; give a folder"):
        JobFolder(out / "notes.txt", job_kind).refuse_foreign()


def test_the_lock_comes_with_the_stale_temp_files_removed(tmp_path):
    folder = JobFolder(tmp_path / "out", RETRAIN_JOB)
    folder.state_dir.mkdir(parents=True)
    stale = [folder.out / f".a{TEMP_SUFFIX}", folder.state_dir / f".b{TEMP_SUFFIX}"]
    for path in stale:
        path.write_text("torn")
    with folder.locked():
        assert (folder.out / LOCK_NAME).is_file()
        assert not any(path.exists() for path in stale)
    assert not (folder.out / LOCK_NAME).exists()


# --------------------------------------------------------------------------- the same-job check
def test_each_command_names_its_own_flags(tmp_path):
    on_disk = {"retrain": {"lr": 0.01, "val_fraction": 0.125}, "model_files": {"model.safetensors": "a"}}
    now = {"retrain": {"lr": 0.02, "val_fraction": 0.25}, "model_files": {"model.safetensors": "b"}}
    with pytest.raises(ValueError) as retrain:
        JobFolder(tmp_path, RETRAIN_JOB).check_same_job(on_disk, now, RETRAIN_FINGERPRINT_FLAGS)
    assert str(retrain.value) == (
        f"--out {tmp_path} holds a different retraining job (--model (its file model.safetensors): a (on disk) vs b "
        "(now); --lr: 0.01 (on disk) vs 0.02 (now); --val: 0.125 (on disk) vs 0.25 (now)); use another --out or the "
        "same flags")
    with pytest.raises(ValueError, match=r"holds a different job \(.*--retrain-lr: 0.01 .*--retrain-val: 0.125 .*--force"):
        JobFolder(tmp_path, RUN_JOB).check_same_job(on_disk, now, RUN_FINGERPRINT_FLAGS)  # run --retrain-steps: the stage's own flags
    with pytest.raises(ValueError, match=r"holds the shrink of another model or plan \(the heads and channels removed"):
        JobFolder(tmp_path, SHRINK_JOB).check_same_job({"plan": {"removed": [1]}}, {"plan": {"removed": [2]}},
                                                 SHRINK_FINGERPRINT_FLAGS)


@pytest.mark.parametrize("kind,way_out", [(RUN_JOB, "pass --force to start over"), (RETRAIN_JOB, "use another --out")])
def test_another_process_count_is_refused_alike_and_absent_means_one(tmp_path, kind, way_out):
    folder = JobFolder(tmp_path, kind)
    folder.check_same_job({"seed": 0}, {"seed": 0, "world_size": 1}, {})  # a count of 1 recorded or not: the same
    with pytest.raises(ValueError, match=rf"^--nproc: .* started with 1 process\(es\) and this run has 2; resume with "
                                         rf"--nproc 1 .*, or {way_out}$"):
        folder.check_same_job({"seed": 0, "world_size": 1}, {"seed": 0, "world_size": 2}, {})


def test_run_names_the_retraining_stage_by_its_own_flags():
    """The stage's settings are ``--retrain-*`` in ``run``; rank, alpha, seed, batch size are the run's own."""
    assert {field: flag_of_field(f"retrain.{field}", RUN_FINGERPRINT_FLAGS) for field in
            ("method", "steps", "batch", "seq_len", "lr", "n_windows", "val_fraction", "rank", "alpha", "seed",
             "micro_batch", "allow_dense_merge", "data", "data.sha256")} == {
        "method": "--retrain-method", "steps": "--retrain-steps", "batch": "--retrain-samples-per-step",
        "seq_len": "--retrain-seq-len", "lr": "--retrain-lr", "n_windows": "--retrain-n-samples",
        "val_fraction": "--retrain-val", "rank": "--rank", "alpha": "--alpha", "seed": "--seed",
        "micro_batch": "--batch-size", "allow_dense_merge": "--allow-dense-merge", "data": "--retrain-data",
        "data.sha256": "--retrain-data (the file's contents)"}
    assert flag_of_field("retrain.warmup", RUN_FINGERPRINT_FLAGS) == "reconstruct retrain's --warmup (its default)"
    assert flag_of_field("retrain.batch", RETRAIN_FINGERPRINT_FLAGS) == "--samples-per-step"
    assert flag_of_field("data.sha256", RETRAIN_FINGERPRINT_FLAGS) == "--data (the file's contents)"
    assert flag_of_field("bos_id", RETRAIN_FINGERPRINT_FLAGS) == "--calib-bos"
    assert flag_of_field("calibration.bos_id", RUN_FINGERPRINT_FLAGS) == "--calib-bos"


def test_every_fingerprint_field_of_a_spec_is_named_by_the_spec_s_flag():
    """The labels are read from the specs: every flagged field of ReconSpec and RetrainSpec has its flag's label."""
    for field, flag in flag_names(ReconSpec).items():
        assert flag_of_field(f"method.{field}", RUN_FINGERPRINT_FLAGS) == flag
    for field, flag in flag_names(RetrainSpec).items():
        assert flag_of_field(f"retrain.{field}", RETRAIN_FINGERPRINT_FLAGS) == flag
        stage = flag_of(RetrainSpec, field).stage
        assert flag_of_field(f"retrain.{field}", RUN_FINGERPRINT_FLAGS).startswith("--retrain-") == bool(stage) or \
            field == "steps"
    assert flag_of_field("sparsegpt.percdamp", RUN_FINGERPRINT_FLAGS) == "--percdamp"


def test_one_text_source_identity(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("some text")
    assert text_source_identity(str(text)) == {"file": "notes.txt", "sha256": hash_text_source(text)}
    assert text_source_identity("wikitext2") == {"name": "wikitext2"}
    assert text_source_identity("self") == {"name": "self"}


# --------------------------------------------------------------------------- records
def test_records_keep_the_layouts_folders_were_written_with(tmp_path):
    retrain = JobFolder(tmp_path / "r", RETRAIN_JOB).new_record({"seed": 0})
    assert json.loads(retrain.path.read_text()) == {"fingerprint": {"seed": 0}, "finished": False}
    retrain.finish()
    assert json.loads(retrain.path.read_text()) == {"fingerprint": {"seed": 0}, "finished": True}

    shrink = JobFolder(tmp_path / "s", SHRINK_JOB)
    record = shrink.new_record({"source": {"config.json": "x"}, "plan": {"removed": []}})
    record.record_file("model-00001-of-00002.safetensors", "ab")
    assert json.loads(record.path.read_text()) == {"source": {"config.json": "x"}, "plan": {"removed": []},
                                                   "files": {"model-00001-of-00002.safetensors": "ab"},
                                                   "finished": False}
    again = shrink.read_record()
    assert (again.fingerprint, again.files, again.finished) == (record.fingerprint, record.files, False)


def test_a_damaged_record_says_what_to_do(tmp_path):
    folder = JobFolder(tmp_path, SHRINK_JOB)
    folder.record_path.write_text("{not json")
    with pytest.raises(ValueError, match=r"is damaged \(.*\); choose another --out or delete it"):
        folder.read_record()
    assert JobRecord.load(tmp_path / "missing.json", flat=False) is None


def test_recorded_files_are_checked_by_their_digest(tmp_path):
    folder = JobFolder(tmp_path, SHRINK_JOB)
    digest = save_safetensors_atomic(tmp_path / "a.safetensors", {"w": torch.ones(2)})
    assert folder.intact({"a.safetensors": digest})
    assert not folder.intact({"a.safetensors": "0" * 64})
    assert not folder.intact({"gone.safetensors": digest})
    assert not folder.file_intact("a.safetensors", None)


# --------------------------------------------------------------------------- the model-folder writer
def _source(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "attention_bias": False}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "reconstruct.json").write_text("{}")  # an earlier job's report: never carried over
    return folder


def test_the_index_comes_from_the_headers_and_is_written_last(tmp_path, monkeypatch):
    source, out = _source(tmp_path / "source"), tmp_path / "out"
    out.mkdir()
    writer = ModelFolderWriter(out, n_blocks=2)
    for index in range(2):
        writer.write_block(index, {f"model.layers.{index}.w": torch.zeros(3, 4)})
    writer.write_rest({"model.embed.weight": torch.zeros(5, 4, dtype=torch.float16)})
    assert index_from_headers(out, writer.shard_files) == (
        {"model.layers.0.w": "model-00001-of-00003.safetensors", "model.layers.1.w": "model-00002-of-00003.safetensors",
         "model.embed.weight": "model-00003-of-00003.safetensors"}, 2 * 48 + 40)

    import reconstruct.modelio.output as output

    seen_at_index: list[set[str]] = []
    real = output.write_index
    monkeypatch.setattr(output, "write_index", lambda *args: (seen_at_index.append({p.name for p in out.iterdir()}),
                                                              real(*args)))
    config = config_with_bias_flags(source, {"attention_bias": ("self_attn.q_proj",)}, {"self_attn.q_proj"})
    written = writer.finish(source, config, {"shrink.json": {"kept": 1}})
    assert written == ["config.json", "shrink.json", INDEX_NAME]
    assert {"config.json", "tokenizer.json", "shrink.json"} <= seen_at_index[0] and INDEX_NAME not in seen_at_index[0]
    assert json.loads((out / "config.json").read_text())["attention_bias"] is True
    assert not (out / "reconstruct.json").exists()
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == 2 * 48 + 40 and list(index["weight_map"]) == sorted(index["weight_map"])
