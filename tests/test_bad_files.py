"""Damaged model files and unusable ``--out`` paths are bad input in every command.

Each is one ``error:`` line naming the flag, the file and what is wrong, exit code 2, no traceback,
and no output folder left behind.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cli import app
from reconstruct.cli.errors import guarded
from reconstruct.modelio.safetensors_header import DamagedFileError, check_safetensors_file
from reconstruct.state import out_folder

runner = CliRunner()
COMMANDS_READING_WEIGHTS = ("run", "eval", "retrain", "inspect", "shrink", "sweep")
COMMANDS_WRITING_OUT = ("run", "retrain", "shrink", "sweep")


def command_args(command: str, model: Path, calib: Path, out: Path) -> list[str]:
    """The shortest CPU command line of ``command`` on ``model`` writing to ``out``."""
    small = ["--n-samples", "2", "--seq-len", "16", "--device", "cpu"]
    return {
        "run": ["run", "--model", str(model), "--calib", str(calib), *small, "--out", str(out)],
        "eval": ["eval", "--model", str(model), "--data", str(calib), "--device", "cpu", "--max-length", "16"],
        "retrain": ["retrain", "--model", str(model), "--data", str(calib), "--out", str(out), "--device", "cpu",
                    "--seq-len", "16", "--steps", "1"],
        "inspect": ["inspect", str(model)],
        "shrink": ["shrink", str(model), "--out", str(out)],
        "sweep": ["sweep", "--model", str(model), "--eval", str(calib), "--calib", str(calib), *small,
                  "--method", "none", "--out", str(out)],
    }[command]


def one_error_line(result) -> str:
    """Exit 2, no traceback, exactly one ``error:`` line (returned)."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.fixture(scope="module")
def truncated_model(tiny_model_dir, tmp_path_factory) -> Path:
    """A copy of the tiny LLaMA whose weights file lost its second half (an interrupted copy)."""
    folder = tmp_path_factory.mktemp("truncated") / "model"
    shutil.copytree(tiny_model_dir("llama"), folder)
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return folder


@pytest.mark.parametrize("command", COMMANDS_READING_WEIGHTS)
def test_truncated_weights_are_one_line_naming_flag_file_and_sizes(command, truncated_model, small_calib_file,
                                                                  tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    line = one_error_line(runner.invoke(app, command_args(command, truncated_model, small_calib_file, out)))
    flag = "FOLDER" if command in ("inspect", "shrink") else "--model"
    assert line.startswith(f"error: {flag} "), line
    assert "model.safetensors" in line and "truncated" in line, line
    full = (truncated_model / "model.safetensors").stat().st_size * 2
    assert f"{full // 2:,} bytes present" in line and f"{full:,} expected" in line, line
    assert not (out / "reconstruct.json").exists()


@pytest.mark.parametrize("command", COMMANDS_WRITING_OUT)
def test_out_under_a_file_is_one_line(command, tiny_model_dir, small_calib_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder\n")
    line = one_error_line(runner.invoke(app, command_args(command, tiny_model_dir("llama"), small_calib_file,
                                                          a_file / "out")))
    assert line.startswith("error: --out "), line
    assert "notes.txt is a file, not a folder" in line, line
    assert a_file.read_text() == "not a folder\n"


@pytest.mark.parametrize("command", COMMANDS_WRITING_OUT)
def test_out_on_a_read_only_disk_is_one_line(command, tiny_model_dir, small_calib_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    read_only = tmp_path / "mounted-ro"
    read_only.mkdir()
    real_statvfs = os.statvfs

    class ReadOnly:  # what statvfs says of a file system mounted read-only
        def __init__(self, path):
            self.f_flag = real_statvfs(path).f_flag | os.ST_RDONLY

    monkeypatch.setattr(out_folder.os, "statvfs", lambda path: ReadOnly(path) if Path(path) == read_only
                        else real_statvfs(path))
    line = one_error_line(runner.invoke(app, command_args(command, tiny_model_dir("llama"), small_calib_file,
                                                          read_only / "out")))
    assert line.startswith("error: --out "), line
    assert "mounted-ro is read-only" in line and "free space" not in line, line
    assert list(read_only.iterdir()) == []


def test_read_only_error_at_write_time_does_not_advise_freeing_space(capsys):
    def write():
        raise OSError(errno.EROFS, "Read-only file system", "/some/out/shard.safetensors")

    with pytest.raises(typer.Exit) as stopped:
        guarded(write)
    assert stopped.value.exit_code == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: Read-only file system: /some/out/shard.safetensors") and "free space" not in line


@pytest.mark.parametrize("damage, words", [
    (lambda path: os.truncate(path, 4), "not even the 8-byte header length"),
    (lambda path: os.truncate(path, 40), "its header alone needs"),
    (lambda path: path.write_bytes(b"\xff" * 64), "not a safetensors file"),
    (lambda path: path.write_bytes(path.read_bytes() + b"extra"), "expected from its header"),
], ids=["cut-in-length", "cut-in-header", "not-safetensors", "padded"])
def test_every_kind_of_damage_is_named(tiny_model_dir, tmp_path, damage, words):
    path = tmp_path / "model.safetensors"
    shutil.copy(tiny_model_dir("llama") / "model.safetensors", path)
    check_safetensors_file(path)  # the intact copy passes
    damage(path)
    with pytest.raises(DamagedFileError, match=words):
        check_safetensors_file(path)


def test_a_shard_the_index_names_but_is_missing_is_named(tiny_model_dir, tmp_path):
    import json

    from reconstruct.modelio.checkpoint import CheckpointReader
    from reconstruct.modelio.safetensors_header import read_safetensors_header

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), folder)
    keys = list(read_safetensors_header(folder / "model.safetensors"))
    weight_map = {key: ("model.safetensors" if i % 2 else "model-00002-of-00002.safetensors") for i, key in enumerate(keys)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(DamagedFileError, match="model-00002-of-00002.safetensors: missing, though "
                                               "model.safetensors.index.json names it"):
        CheckpointReader(folder)
    line = one_error_line(runner.invoke(app, ["inspect", str(folder)]))
    assert "missing" in line, line
