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
import torch
from typer.testing import CliRunner

from conftest import make_job

from cli import app
from reconstruct.modelio.loaded import load_model
from reconstruct.methods.spec import ReconSpec
from reconstruct.planner import GIB, MemoryBudget, choose_stream_tier, plan_job, streams_fit_free_memory
from reconstruct.planner.tier import AUTO_HOST_SHARE
from reconstruct.jobs.job_state import JobState

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


def test_auto_takes_the_fastest_tier_that_fits():
    asked: list[str] = []

    def fits_from_cpu(tier: str) -> bool:
        asked.append(tier)
        return tier != "device"

    assert choose_stream_tier("auto", "cuda", fits_from_cpu) == "cpu"
    assert asked == ["device", "cpu"]  # fastest first, stops at the first that fits
    assert choose_stream_tier("auto", "cpu", lambda tier: False) == "disk"  # nothing fits: disk always runs
    assert choose_stream_tier("auto", "cpu", lambda tier: True) == "cpu"  # no device tier on CPU runs
    assert choose_stream_tier("device", "cpu", fits_from_cpu) == "device"  # an explicit --offload is kept
    assert asked == ["device", "cpu"]  # ... without asking


def test_without_a_plan_the_streams_need_a_share_of_free_memory(monkeypatch):
    class Memory:
        available = 1000

    monkeypatch.setattr("psutil.virtual_memory", lambda: Memory)
    cpu = torch.device("cpu")
    assert choose_stream_tier("auto", "cpu", streams_fit_free_memory(int(AUTO_HOST_SHARE * 1000), cpu)) == "cpu"
    assert choose_stream_tier("auto", "cpu", streams_fit_free_memory(int(AUTO_HOST_SHARE * 1000) + 1, cpu)) == "disk"


@pytest.mark.parametrize("tight", [False, True], ids=["cpu", "disk"])
def test_the_job_streams_on_the_tier_its_plan_chose(tiny_model_dir, short_calib, tmp_path, monkeypatch, tight):
    """``run --offload auto``: the tier the job state opens its streams on is the plan's, for each budget."""
    model = tiny_model_dir("llama")
    loaded = load_model(str(model), "cpu", "float32")
    job = make_job(model, tmp_path / "unused", "wanda", sparsity=0.5, calib=short_calib, n_samples=N_SAMPLES,
                   seq_len=SEQ_LEN, recon=ReconSpec(method="bias-ln", steps=1))
    disk_plan = plan_job(replace(job, offload="disk"), loaded)
    budget = disk_plan.host_peak + disk_plan.sizes["stream"] if tight else 64 * GIB  # tight: under the cpu tier's peak
    planned = plan_job(job, loaded, MemoryBudget(host_bytes=budget))
    assert planned.fits and planned.stream_tier == ("disk" if tight else "cpu"), planned.format()

    chosen: list[str] = []
    offload_tier = JobState.offload_tier

    def recording(self, *args, **kwargs):
        chosen.append(offload_tier(self, *args, **kwargs))
        return chosen[-1]

    monkeypatch.setattr(JobState, "offload_tier", recording)
    result = run(model, short_calib, tmp_path / "out", "--offload", "auto", "--host-memory", str(budget))
    assert result.exit_code == 0, result.output
    assert chosen == [planned.stream_tier]
