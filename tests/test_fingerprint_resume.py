"""Resume checks that read little: an edited shard is refused, unchanged block files are not re-read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY_CONFIGS, VOCAB_SIZE, WIKITEXT_VALID, build_word_tokenizer, make_job
from reconstruct.atomic import sha256_file


def save_wide_opt(folder: Path) -> Path:
    """The tiny OPT with 8192 embedding rows: a 2+ MiB shard whose middle lies in the embedding."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS["opt"]().__class__(
        **{**TINY_CONFIGS["opt"]().to_dict(), "vocab_size": 8192}))
    model.save_pretrained(folder)
    build_word_tokenizer(WIKITEXT_VALID, VOCAB_SIZE).save_pretrained(folder)
    return folder


def counting(monkeypatch, module: str) -> list[Path]:
    """Every file ``module`` hashes with ``sha256_file``."""
    import importlib

    calls: list[Path] = []

    def count(path, *args, **kwargs):
        calls.append(Path(path))
        return sha256_file(path, *args, **kwargs)

    monkeypatch.setattr(importlib.import_module(module), "sha256_file", count)
    return calls


@pytest.fixture
def finished(tmp_path, small_calib_file):
    from reconstruct.jobs.run_job import run_job

    model = save_wide_opt(tmp_path / "model")
    shard = model / "model.safetensors"
    assert shard.stat().st_size > 2 * (1 << 20) + 4096
    job = make_job(model, tmp_path / "out", "magnitude", sparsity=0.5, calib=small_calib_file, n_samples=2)
    run_job(job)
    return job, shard


def test_edit_in_the_middle_of_a_shard_is_refused_on_resume(finished):
    from reconstruct.jobs.run_job import run_job

    job, shard = finished
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # far from the first and last MiB
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"different job \(--model \(its file model\.safetensors\)"):
        run_job(job)


def test_unchanged_rerun_reads_neither_the_model_nor_the_blocks(finished, monkeypatch):
    from reconstruct.jobs.run_job import run_job

    job, shard = finished
    model_reads = counting(monkeypatch, "reconstruct.state.fingerprint")
    block_reads = counting(monkeypatch, "reconstruct.state.manifest")
    again = run_job(job)
    assert again["already_finished"]
    assert [path for path in model_reads if path.parent == shard.parent] == []  # digests remembered in --out/.reconstruct
    assert model_reads == [Path(job.calib.source)]  # the calibration text (small) is hashed at every start
    assert block_reads == []  # block files trusted by their recorded stat
