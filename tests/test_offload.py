"""The disk tier of the activation cache: a host budget too small for the two streams still runs, bit-identically.

The budget is derived from the memory plan itself: enough for everything the disk-tier run keeps in
host memory, plus less than the two streams. The plan refuses the cpu tier under it and ``--offload
auto`` picks the disk tier; ``run --offload disk`` under that budget completes with the same output
shards as ``run --offload cpu`` without one.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_job

from cli import app
from reconstruct.modelio.loaded import load_model
from reconstruct.methods.spec import ReconSpec
from reconstruct.planner import MemoryBudget, plan_job

N_SAMPLES, SEQ_LEN = 48, 64  # two streams of 768 KiB each at hidden 64, float32
CALIB_CHARS = 6_000  # a short text: tokenizing it needs less host memory than the streams


@pytest.fixture()
def short_calib(calib_file, tmp_path) -> Path:
    text = calib_file.read_text(encoding="utf-8")[:CALIB_CHARS]
    path = tmp_path / "calib.txt"
    path.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")
    return path


def run(model: Path, calib: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, [
        "run", "--model", str(model), "--calib", str(calib), "--n-samples", str(N_SAMPLES), "--seq-len", str(SEQ_LEN),
        "--device", "cpu", "--pruner", "wanda", "--sparsity", "0.5", "--method", "bias-ln", "--recon-steps", "1",
        "--out", str(out), *extra,
    ])


def shards(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.glob("model-*.safetensors"))}


def test_disk_tier_under_a_budget_smaller_than_the_streams(tiny_model_dir, short_calib, tmp_path):
    model = tiny_model_dir("llama")
    loaded = load_model(str(model), "cpu", "float32")
    job = make_job(model, tmp_path / "unused", "wanda", sparsity=0.5, calib=short_calib, n_samples=N_SAMPLES,
                   seq_len=SEQ_LEN, recon=ReconSpec(method="bias-ln", steps=1))  # the job run() starts: two streams
    disk_peak = plan_job(replace(job, offload="disk"), loaded).host_peak
    cpu_plan = plan_job(replace(job, offload="cpu"), loaded)
    streams = 2 * cpu_plan.sizes["stream"]
    budget = disk_peak + streams // 2  # room for half of the two streams, no more
    assert cpu_plan.host_peak > budget, "the cpu tier must need more than the budget"
    assert budget - disk_peak < streams
    auto = plan_job(job, loaded, MemoryBudget(host_bytes=budget))
    assert auto.stream_tier == "disk" and auto.fits, auto.format()

    refused = plan_job(replace(job, offload="cpu"), loaded, MemoryBudget(host_bytes=budget))
    assert not refused.fits and "--offload disk" in refused.refusal()

    on_disk = run(model, short_calib, tmp_path / "disk", "--offload", "disk", "--host-memory", str(budget))
    assert on_disk.exit_code == 0, on_disk.output
    in_memory = run(model, short_calib, tmp_path / "cpu", "--offload", "cpu")
    assert in_memory.exit_code == 0, in_memory.output

    disk_shards, cpu_shards = shards(tmp_path / "disk"), shards(tmp_path / "cpu")
    assert len(cpu_shards) == loaded.layout.n_blocks + 1
    assert disk_shards == cpu_shards
    assert not list((tmp_path / "disk" / ".reconstruct").glob("stream-*.bin"))  # working files removed at the end
