"""Manifest round trip, fingerprint diffs, damaged files, block-file checks, model fingerprints."""

from __future__ import annotations

import enum
import json
import struct
from pathlib import Path

import pytest
import torch

from reconstruct.atomic import save_safetensors_atomic, sha256_file
from reconstruct.jobs.run_fingerprint import RUN_FINGERPRINT_FLAGS
from reconstruct.state.fingerprint import HashCache, fingerprint_model_files, hash_text_source
from reconstruct.state.job_diff import flag_of_field
from reconstruct.state.manifest import (
    DONE,
    MANIFEST_NAME,
    PENDING,
    Manifest,
    diff_fingerprints,
    verify_block_files,
    verify_stream_checkpoint,
)


class Method(str, enum.Enum):
    MASKLORA = "masklora"


def _fingerprint(**changes) -> dict:
    base = {
        "model": {"files": {"config.json": "size=10 sha256=aa", "model.safetensors": "size=99 header=bb"}},
        "pruner": "wanda",
        "sparsity": 0.5,
        "pattern": "unstructured",
        "method": {"name": Method.MASKLORA, "rank": 8, "lr": 1e-4},
        "calibration": {"source": Path("/data/wikitext-2/valid.txt"), "sha256": "cc"},
        "n_samples": 128,
        "seq_len": 2048,
        "seed": 0,
        "dtype": torch.float16,
        "shape": (4, 4),
        "versions": {"torch": "2.13.0"},
    }
    base.update(changes)
    return base


def _write_block(out: Path, index: int, seed: int = 0) -> tuple[str, str]:
    name = f"blocks/block-{index:03d}.safetensors"
    (out / "blocks").mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed + index)
    digest = save_safetensors_atomic(out / name, {"w": torch.randn(32, 32, generator=gen)})
    return name, digest


# ---------------------------------------------------------------------- manifest
def test_new_manifest_is_all_pending():
    manifest = Manifest.new(_fingerprint(), 3)
    assert [b.status for b in manifest.blocks] == [PENDING] * 3
    assert manifest.first_unfinished_block() == 0
    assert manifest.fingerprint["dtype"] == "float16" and manifest.fingerprint["shape"] == [4, 4]
    assert manifest.fingerprint["method"]["name"] == "masklora"


def test_round_trip(tmp_path):
    assert Manifest.load(tmp_path) is None
    manifest = Manifest.new(_fingerprint(), 4)
    name, digest = _write_block(tmp_path, 0)
    manifest.mark_block_done(0, name, digest, {"mse_before": 0.25, "mse_after": torch.tensor(0.125), "seconds": 3})
    manifest.set_stream_checkpoint(0, "streams.pt", "ab" * 32)
    manifest.save(tmp_path)
    loaded = Manifest.load(tmp_path)
    assert loaded == manifest
    assert loaded.blocks[0].stats == {"mse_before": 0.25, "mse_after": 0.125, "seconds": 3}
    assert loaded.first_unfinished_block() == 1
    assert diff_fingerprints(loaded.fingerprint, _fingerprint()) == []
    text = (tmp_path / MANIFEST_NAME).read_text()
    assert text.endswith("\n") and json.loads(text)["version"] == 1


def test_elapsed_and_timestamps_round_trip(tmp_path):
    manifest = Manifest.new(_fingerprint(), 1)
    assert manifest.created and manifest.created == manifest.updated and manifest.elapsed_seconds == 0.0
    manifest.elapsed_seconds += 12.5  # the engine adds each session's working time
    manifest.save(tmp_path)
    resumed = Manifest.load(tmp_path)
    resumed.elapsed_seconds += 2.5
    resumed.save(tmp_path)
    again = Manifest.load(tmp_path)
    assert again.elapsed_seconds == 15.0 and again.created == manifest.created


def test_all_done_and_finished(tmp_path):
    manifest = Manifest.new(_fingerprint(), 2)
    for i in range(2):
        manifest.mark_block_done(i, *_write_block(tmp_path, i), {})
    assert manifest.first_unfinished_block() == 2
    manifest.finished = True
    manifest.save(tmp_path)
    assert Manifest.load(tmp_path).finished


def test_mark_block_done_validates():
    manifest = Manifest.new(_fingerprint(), 2)
    with pytest.raises(IndexError):
        manifest.mark_block_done(2, "b.safetensors", "00", {})
    with pytest.raises(ValueError, match="relative"):
        manifest.mark_block_done(0, "/etc/passwd", "00", {})
    with pytest.raises(ValueError, match="relative"):
        manifest.mark_block_done(0, "../elsewhere.safetensors", "00", {})


@pytest.mark.parametrize(
    "content",
    [
        b'{"version": 1, "fingerprint": {}, "n_blo',  # truncated
        b"\x00\x00\x00\x00",  # zero-filled after a power cut
        b"[]",
        b'{"version": 1}',
        b'{"version": 99, "fingerprint": {}, "n_blocks": 0, "blocks": []}',
    ],
)
def test_damaged_manifest_is_a_clear_error(tmp_path, content):
    (tmp_path / MANIFEST_NAME).write_bytes(content)
    with pytest.raises(ValueError) as info:
        Manifest.load(tmp_path)
    message = str(info.value)
    assert "damaged" in message and "--force" in message and MANIFEST_NAME in message
    assert "\n" not in message


def test_damaged_block_list(tmp_path):
    data = Manifest.new(_fingerprint(), 3).to_dict()
    data["blocks"].pop(1)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="damaged.*0..2"):
        Manifest.load(tmp_path)


# ---------------------------------------------------------------------- fingerprints
def test_diff_fingerprints_lists_exactly_the_changes():
    old = _fingerprint()
    new = _fingerprint(sparsity=0.6, seed=1)
    new["method"] = {**new["method"], "rank": 16}
    new["model"] = {"files": {**old["model"]["files"], "model.safetensors": "size=99 header=dd"}}
    assert diff_fingerprints(old, new) == [
        "method.rank: 8 (on disk) vs 16 (now)",
        "model.files.model.safetensors: size=99 header=bb (on disk) vs size=99 header=dd (now)",
        "seed: 0 (on disk) vs 1 (now)",
        "sparsity: 0.5 (on disk) vs 0.6 (now)",
    ]


def test_diff_fingerprints_added_removed_and_types():
    old = {"a": 1, "b": True, "c": [1, 2], "d": {"x": 1}}
    new = {"a": 1.0, "b": 1, "c": (1, 2), "e": "new"}
    assert diff_fingerprints(old, new) == [
        "b: true (on disk) vs 1 (now)",
        "d.x: 1 (on disk) vs <absent> (now)",
        "e: <absent> (on disk) vs new (now)",
    ]
    assert diff_fingerprints(_fingerprint(), _fingerprint()) == []


def test_check_same_job(tmp_path):
    manifest = Manifest.new(_fingerprint(), 1)
    manifest.check_same_job(_fingerprint(), tmp_path, RUN_FINGERPRINT_FLAGS)
    with pytest.raises(ValueError, match=r"sparsity: 0.5 \(on disk\) vs 0.6 \(now\).*--force"):
        manifest.check_same_job(_fingerprint(sparsity=0.6), tmp_path, RUN_FINGERPRINT_FLAGS)


@pytest.mark.parametrize(("before", "now"), [(1, 2), (2, 1), (2, 4)])
def test_resume_with_another_process_count_is_refused_naming_nproc(tmp_path, before, now):
    def made_by(processes: int) -> dict:  # as job_fingerprint writes it: the key only when > 1
        return _fingerprint(**({"world_size": processes} if processes > 1 else {}))

    manifest = Manifest.new(made_by(before), 1)
    manifest.check_same_job(made_by(before), tmp_path, RUN_FINGERPRINT_FLAGS)
    with pytest.raises(ValueError, match=rf"^--nproc: .* started with {before} process\(es\) and this run has {now};"
                                         rf" resume with --nproc {before}"):
        manifest.check_same_job(made_by(now), tmp_path, RUN_FINGERPRINT_FLAGS)


# ---------------------------------------------------------------------- block files
def test_verify_block_files_detects_truncation_and_flipped_byte(tmp_path):
    manifest = Manifest.new(_fingerprint(), 5)
    for i in range(4):
        manifest.mark_block_done(i, *_write_block(tmp_path, i), {"mse": 0.1})
    assert verify_block_files(manifest, tmp_path) == []

    truncated = tmp_path / manifest.blocks[1].file
    truncated.write_bytes(truncated.read_bytes()[:-100])
    flipped = tmp_path / manifest.blocks[2].file
    data = bytearray(flipped.read_bytes())
    data[-7] ^= 0x01
    flipped.write_bytes(bytes(data))
    (tmp_path / manifest.blocks[3].file).unlink()

    assert verify_block_files(manifest, tmp_path) == [1, 2, 3]
    assert [b.status for b in manifest.blocks] == [DONE, PENDING, PENDING, PENDING, PENDING]
    assert manifest.blocks[2].file is None and manifest.blocks[2].stats == {}
    assert manifest.first_unfinished_block() == 1


def test_verify_stream_checkpoint(tmp_path):
    manifest = Manifest.new(_fingerprint(), 2)
    assert not verify_stream_checkpoint(manifest, tmp_path)
    name, digest = _write_block(tmp_path, 0)
    manifest.set_stream_checkpoint(0, name, digest)
    assert verify_stream_checkpoint(manifest, tmp_path)
    (tmp_path / name).write_bytes(b"junk")
    assert not verify_stream_checkpoint(manifest, tmp_path)
    assert manifest.stream_checkpoint is None


# ---------------------------------------------------------------------- model fingerprints
def _model_dir(root: Path, scale: float = 1.0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2}')
    (root / "README.md").write_text("notes")
    gen = torch.Generator().manual_seed(0)
    save_safetensors_atomic(root / "model.safetensors", {"w": torch.randn(600, 1000, generator=gen) * scale})
    return root


def test_fingerprint_stable_and_ignores_readme(tmp_path):
    model = _model_dir(tmp_path / "m")
    first = fingerprint_model_files(model)
    assert set(first) == {"config.json", "model.safetensors"}
    (model / "README.md").write_text("edited")
    assert fingerprint_model_files(model) == first
    copy = _model_dir(tmp_path / "copy")
    assert fingerprint_model_files(copy) == first


def test_fingerprint_changes_with_safetensors_header(tmp_path):
    model = _model_dir(tmp_path / "m")
    before = fingerprint_model_files(model)
    save_safetensors_atomic(model / "model.safetensors", {"w": torch.zeros(600, 1000)}, {"note": "x"})
    after = fingerprint_model_files(model)
    assert after["model.safetensors"] != before["model.safetensors"]
    assert after["config.json"] == before["config.json"]
    # same shapes and sizes, other weights
    other = _model_dir(tmp_path / "other", scale=2.0)
    assert fingerprint_model_files(other)["model.safetensors"] != before["model.safetensors"]


def test_fingerprint_changes_with_config(tmp_path):
    model = _model_dir(tmp_path / "m")
    before = fingerprint_model_files(model)
    (model / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 3}')
    changes = diff_fingerprints(before, fingerprint_model_files(model))
    assert len(changes) == 1 and changes[0].startswith("config.json: size=")


def test_fingerprint_bin_shards(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "pytorch_model.bin.index.json").write_text('{"weight_map": {}}')
    shard = model / "pytorch_model-00001-of-00001.bin"
    payload = bytearray(range(256)) * (3 * 4096 + 7)  # > 2 MiB
    shard.write_bytes(bytes(payload))
    first = fingerprint_model_files(model)
    assert set(first) == {"pytorch_model.bin.index.json", "pytorch_model-00001-of-00001.bin"}
    assert fingerprint_model_files(model) == first
    payload[-10] ^= 0xFF  # last MiB
    shard.write_bytes(bytes(payload))
    second = fingerprint_model_files(model)
    assert second[shard.name] != first[shard.name]
    payload.append(0)  # size
    shard.write_bytes(bytes(payload))
    assert fingerprint_model_files(model)[shard.name] not in (first[shard.name], second[shard.name])
    small = model / "tiny.pt"
    torch.save({"w": torch.ones(3)}, small)
    assert fingerprint_model_files(model)["tiny.pt"].startswith(f"size={small.stat().st_size} ")


def test_fingerprint_damaged_safetensors_header_does_not_crash(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "broken.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    broken = model / "broken.safetensors"
    assert fingerprint_model_files(model)["broken.safetensors"] == f"size=10 sha256={sha256_file(broken)}"


def test_fingerprint_single_file_and_missing(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    assert list(fingerprint_model_files(gguf)) == ["model.gguf"]
    with pytest.raises(ValueError, match="--model"):
        fingerprint_model_files(tmp_path / "missing")


def test_hash_text_source(tmp_path):
    text = tmp_path / "valid.txt"
    text.write_bytes(b"hello world\n" * 100_000)
    assert hash_text_source(text) == hash_text_source(str(text)) == hash_text_source(text.read_bytes())
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("one")
    (folder / "b.txt").write_text("two")
    before = hash_text_source(folder)
    (folder / "b.txt").rename(folder / "c.txt")
    assert hash_text_source(folder) != before
    with pytest.raises(ValueError, match="calibration source"):
        hash_text_source(tmp_path / "nope.txt")


def test_refusal_names_flags_not_fingerprint_fields(tmp_path):
    """The issue's example: method and sparsity changed → ``--method``, ``--sparsity``; N:M parts once as ``--pattern``."""
    old = {"method": {"method": "bias-ln", "steps": 64}, "pattern": {"kind": "unstructured", "sparsity": 0.5,
                                                                      "n": None, "m": None}}
    new = {"method": {"method": "masklora", "steps": 64}, "pattern": {"kind": "nm", "sparsity": 0.5, "n": 2, "m": 4}}
    assert diff_fingerprints(old, new, label=lambda key: flag_of_field(key, RUN_FINGERPRINT_FLAGS)) == [
        "--method: bias-ln (on disk) vs masklora (now)",
        "--pattern: unstructured (on disk) vs nm (now)",
    ]
    with pytest.raises(ValueError, match="--method: bias-ln") as refused:
        Manifest.new(old, n_blocks=2).check_same_job(new, tmp_path, RUN_FINGERPRINT_FLAGS)
    assert "method.method" not in str(refused.value)


# ---------------------------------------------------------------------- whole-file hashes, read once
def _counting_sha256(monkeypatch, module: str) -> list[Path]:
    """Record every file ``module`` hashes with ``sha256_file``."""
    import importlib

    target = importlib.import_module(module)
    calls: list[Path] = []

    def counting(path, *args, **kwargs):
        calls.append(Path(path))
        return sha256_file(path, *args, **kwargs)

    monkeypatch.setattr(target, "sha256_file", counting)
    return calls


def test_fingerprint_sees_an_edit_in_the_middle_of_a_shard(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    shard = model / "model.safetensors"
    save_safetensors_atomic(shard, {"w": torch.zeros(1024, 1024)})  # 4 MiB: the middle is far from both ends
    before = fingerprint_model_files(model)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert fingerprint_model_files(model)["model.safetensors"] != before["model.safetensors"]


def test_hash_cache_reads_a_file_once_until_it_changes(tmp_path, monkeypatch):
    calls = _counting_sha256(monkeypatch, "reconstruct.state.fingerprint")
    model = _model_dir(tmp_path / "m")
    cache_path = tmp_path / "out" / ".reconstruct" / "file-hashes.json"
    cache = HashCache(cache_path)
    first = fingerprint_model_files(model, cache)
    cache.save()
    assert sorted(path.name for path in calls) == ["config.json", "model.safetensors"]
    calls.clear()
    assert fingerprint_model_files(model, HashCache(cache_path)) == first  # a later resume: stat only
    assert calls == []
    shard = model / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    changed = fingerprint_model_files(model, HashCache(cache_path))
    assert [path.name for path in calls] == ["model.safetensors"]
    assert changed["model.safetensors"] != first["model.safetensors"] and changed["config.json"] == first["config.json"]


def test_unchanged_block_files_are_not_re_hashed(tmp_path, monkeypatch):
    from reconstruct.state.fingerprint import file_stat

    calls = _counting_sha256(monkeypatch, "reconstruct.state.manifest")
    manifest = Manifest.new(_fingerprint(), 3)
    for i in range(3):
        name, digest = _write_block(tmp_path, i)
        manifest.mark_block_done(i, name, digest, {}, file_stat(tmp_path / name))
    manifest.save(tmp_path)
    manifest = Manifest.load(tmp_path)  # the stats survive the JSON round trip
    assert verify_block_files(manifest, tmp_path) == []
    assert calls == []
    damaged = tmp_path / manifest.blocks[1].file  # bytes and mtime change
    data = bytearray(damaged.read_bytes())
    data[-7] ^= 0x01
    damaged.write_bytes(bytes(data))
    assert verify_block_files(manifest, tmp_path) == [1]
    assert calls == [damaged]


def test_block_records_without_stat_are_re_hashed(tmp_path, monkeypatch):
    calls = _counting_sha256(monkeypatch, "reconstruct.state.manifest")
    manifest = Manifest.new(_fingerprint(), 1)
    manifest.mark_block_done(0, *_write_block(tmp_path, 0), {})  # a manifest written before stats were recorded
    assert verify_block_files(manifest, tmp_path) == []
    assert calls == [tmp_path / manifest.blocks[0].file]
