"""Atomic writes: content, failure at every step, determinism of safetensors bytes."""

from __future__ import annotations

import errno
import json
import os

import pytest
import safetensors.torch
import torch

from reconstruct import atomic
from reconstruct.atomic import (
    TEMP_SUFFIX,
    DiskWriteError,
    atomic_write_bytes,
    atomic_write_json,
    remove_stale_temp_files,
    save_safetensors_atomic,
    sha256_file,
)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(TEMP_SUFFIX))


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "model.layers.0.mlp.down_proj.weight": torch.randn(8, 16, generator=gen).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 8, generator=gen).t(),  # non-contiguous
        "model.layers.0.input_layernorm.weight": torch.randn(16, generator=gen).half(),
        "model.layers.0.mask": torch.rand(4, 4, generator=gen) > 0.5,
        "model.layers.0.step": torch.tensor(3, dtype=torch.int64),
        "model.layers.0.empty": torch.zeros(0, 3),
    }


def test_atomic_write_bytes_writes_and_replaces(tmp_path):
    target = tmp_path / "a.bin"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert _leftovers(tmp_path) == []


def test_atomic_write_json_format(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_json(target, {"b": 1, "a": [1, 2]})
    text = target.read_text()
    assert text == json.dumps({"a": [1, 2], "b": 1}, indent=2) + "\n"


class _HalfWriteFile:
    """Stands in for the temp file: writes half the data, then reports a full disk."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, data):
        self._handle.write(bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("step", ["write", "fsync", "replace"])
def test_failure_mid_write_keeps_old_file(tmp_path, monkeypatch, step):
    target = tmp_path / "block.safetensors"
    atomic_write_bytes(target, b"old content")
    if step == "write":
        real_fdopen = os.fdopen
        monkeypatch.setattr(atomic.os, "fdopen", lambda fd, mode: _HalfWriteFile(real_fdopen(fd, mode)))
    else:
        monkeypatch.setattr(atomic.os, step, _no_space)

    with pytest.raises(DiskWriteError) as info:
        atomic_write_bytes(target, b"new content that does not fit")
    message = str(info.value)
    assert str(target) in message and "free space" in message and "--out" in message
    assert "\n" not in message
    assert info.value.errno == errno.ENOSPC
    assert isinstance(info.value, ValueError)  # the CLI maps ValueError to exit code 2
    monkeypatch.undo()
    assert target.read_bytes() == b"old content"
    assert _leftovers(tmp_path) == []


def test_failure_mid_safetensors_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "block.safetensors"
    old_digest = save_safetensors_atomic(target, _tensors(seed=1))
    monkeypatch.setattr(atomic.os, "fsync", _no_space)
    with pytest.raises(DiskWriteError, match="block.safetensors"):
        save_safetensors_atomic(target, _tensors(seed=2))
    monkeypatch.undo()
    assert sha256_file(target) == old_digest
    assert _leftovers(tmp_path) == []


def test_failure_on_new_file_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "new.json"
    monkeypatch.setattr(atomic.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(DiskWriteError, match="new.json"):
        atomic_write_json(target, {"a": 1})
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_simulated(tmp_path, monkeypatch):
    real_open = os.open

    def deny(path, flags, mode=0o777, **kwargs):
        if str(path).endswith(TEMP_SUFFIX):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(atomic.os, "open", deny)
    with pytest.raises(DiskWriteError) as info:
        atomic_write_bytes(tmp_path / "x", b"data")
    assert "permission denied" in str(info.value) and str(tmp_path) in str(info.value)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permissions")
def test_unwritable_folder_real(tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(DiskWriteError, match="permission denied"):
            atomic_write_bytes(locked / "x", b"data")
    finally:
        locked.chmod(0o755)


def test_read_only_file_system_message(tmp_path):
    err = DiskWriteError.from_oserror(tmp_path / "f", OSError(errno.EROFS, "Read-only file system"))
    assert "read-only" in str(err) and "--out" in str(err)


def test_missing_folder(tmp_path):
    with pytest.raises(DiskWriteError, match="does not exist"):
        atomic_write_bytes(tmp_path / "nope" / "x", b"data")


def test_exception_in_caller_removes_temp(tmp_path):
    target = tmp_path / "t.safetensors"
    bad = {"w": torch.ones(2), "x": torch.ones(2, dtype=torch.complex128)}  # unsupported dtype
    with pytest.raises(ValueError, match="complex128"):
        save_safetensors_atomic(target, bad)
    assert list(tmp_path.iterdir()) == []


def test_save_safetensors_returns_sha_and_roundtrips(tmp_path):
    tensors = _tensors()
    target = tmp_path / "block-000.safetensors"
    digest = save_safetensors_atomic(target, tensors, {"block": "0"})
    assert digest == sha256_file(target)
    loaded = safetensors.torch.load_file(target)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)
    with safetensors.safe_open(target, "pt") as handle:
        assert handle.metadata() == {"block": "0", "format": "pt"}
    assert _leftovers(tmp_path) == []


def test_save_safetensors_is_byte_deterministic(tmp_path):
    meta = {"z": "1", "format": "pt", "a": "2", "m": "3"}  # the library's own order varies here
    first = save_safetensors_atomic(tmp_path / "a.safetensors", _tensors(), meta)
    second = save_safetensors_atomic(tmp_path / "b.safetensors", dict(reversed(_tensors().items())), dict(meta))
    assert first == second
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    third = save_safetensors_atomic(tmp_path / "c.safetensors", _tensors(seed=1), meta)
    assert third != first


def test_save_safetensors_matches_library_bytes(tmp_path):
    tensors = {k: v.contiguous() for k, v in _tensors().items()}
    ours = tmp_path / "ours.safetensors"
    save_safetensors_atomic(ours, tensors)
    assert ours.read_bytes() == safetensors.torch.save(tensors, metadata={"format": "pt"})


def test_save_safetensors_shared_storage(tmp_path):
    weight = torch.randn(4, 4)
    digest = save_safetensors_atomic(tmp_path / "tied.safetensors", {"a": weight, "b": weight, "c": weight[1]})
    loaded = safetensors.torch.load_file(tmp_path / "tied.safetensors")
    assert torch.equal(loaded["a"], weight) and torch.equal(loaded["c"], weight[1])
    assert digest == sha256_file(tmp_path / "tied.safetensors")


def test_sha256_file_chunking(tmp_path):
    data = os.urandom(3000)
    (tmp_path / "f").write_bytes(data)
    import hashlib

    assert sha256_file(tmp_path / "f", chunk=7) == hashlib.sha256(data).hexdigest()


def test_remove_stale_temp_files(tmp_path):
    stale = tmp_path / f".block-003.safetensors.123.abcd{TEMP_SUFFIX}"
    stale.write_bytes(b"half")
    keep = tmp_path / "block-003.safetensors"
    keep.write_bytes(b"whole")
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert not stale.exists() and keep.exists()
    assert remove_stale_temp_files(tmp_path / "missing") == []


def test_side_files_are_copied_atomically(tmp_path):
    """A process killed while copying a tokenizer file leaves the old file whole (temp written, not renamed)."""
    import subprocess
    import sys

    source, out = tmp_path / "model", tmp_path / "out"
    source.mkdir()
    out.mkdir()
    (source / "tokenizer.json").write_bytes(b"new tokenizer" * 1000)
    (source / "model.safetensors").write_bytes(b"weights are not side files")
    (out / "tokenizer.json").write_bytes(b"old tokenizer")
    code = "import sys; from pathlib import Path; from reconstruct.modelio.output import copy_side_files; " \
           "copy_side_files(Path(sys.argv[1]), Path(sys.argv[2]))"
    env = {**os.environ, "RECONSTRUCT_CRASH_AT": "write:tokenizer.json"}
    killed = subprocess.run([sys.executable, "-c", code, str(source), str(out)], env=env)
    assert killed.returncode == -9  # reached the atomic writer's crash point, between write and rename
    assert (out / "tokenizer.json").read_bytes() == b"old tokenizer"
    assert len(remove_stale_temp_files(out)) == 1
    from reconstruct.modelio.output import copy_side_files

    copy_side_files(source, out)
    assert (out / "tokenizer.json").read_bytes() == b"new tokenizer" * 1000
    assert sorted(path.name for path in out.iterdir()) == ["tokenizer.json"]


def test_side_files_of_an_earlier_job_are_not_carried_over(tmp_path):
    """An input folder that is itself a job's output (run, retrain, shrink) lends only its tokenizer files.

    Before, ``reconstruct retrain`` on a pruned folder wrote the pruning job's manifest and report next to
    its own model, and ``run`` on such a folder overwrote its own manifest with the input's until the end.
    """
    from reconstruct.modelio.output import copy_side_files
    from reconstruct.reporting.loraprune_report import FIGURE_NAME as LORAPRUNE_FIGURE
    from reconstruct.reporting.report import FIGURE_NAME
    from reconstruct.modelio.folder_layout import SHRINK_SUMMARY_NAME as SUMMARY_NAME
    from reconstruct.state.manifest import MANIFEST_NAME

    source, out = tmp_path / "pruned", tmp_path / "out"
    source.mkdir()
    out.mkdir()
    job_files = [MANIFEST_NAME, "reconstruct.json", "report.md", FIGURE_NAME, LORAPRUNE_FIGURE, SUMMARY_NAME,
                 ".reconstruct.lock", ".shrink-state.json"]
    for name in [*job_files, "tokenizer.json", "generation_config.json", "config.json", "model.safetensors"]:
        (source / name).write_text(name)
    copy_side_files(source, out)
    assert sorted(path.name for path in out.iterdir()) == ["generation_config.json", "tokenizer.json"]
