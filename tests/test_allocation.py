"""Per-block sparsity (``--allocation owl|FILE.json``): the pure allocation, and jobs on the tiny LLaMA.

The pure function's weighted mean is exact up to float64 rounding (bisection to below float64
resolution), so it is compared to ``1e-12``. Achieved sparsities are whole weights per row: a
block's sparsity is below its target by less than one weight per row, ``1 / in_features``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, save_tiny_model
from forked_cli import run_reconstruct
from pruners.allocation import check_explicit_sparsities, outlier_ratio, owl_sparsities, weighted_mean
from reconstruct.faults import CRASH_ENV
from reconstruct.state.manifest import Manifest

EXACT = 1e-12  # the bisection's solution, in float64
RUN_TIMEOUT_S = 240
TARGET, LAMBDA = 0.6, 0.08
JOB_FLAGS = ["--n-samples", "8", "--seq-len", "32", "--device", "cpu", "--pruner", "wanda", "--seed", "1"]


# --------------------------------------------------------------------------- the pure allocation
def test_outlier_ratio_counts_scores_above_m_times_the_pooled_mean():
    # 99 scores of 1 and one of 1000 over two tensors: mean 10.99, threshold 54.95, one outlier of 100
    scores = [torch.ones(9, 10), torch.cat([torch.ones(9), torch.tensor([1000.0])])]
    assert outlier_ratio(scores, m=5) == pytest.approx(0.01, abs=EXACT)
    assert outlier_ratio(scores, m=100) == 0.0  # threshold 1099 > 1000


@pytest.mark.parametrize("counts", [[100, 100, 100, 100], [10, 300, 50, 1000]], ids=["equal", "unequal"])
def test_weighted_mean_is_the_target_and_every_block_within_lambda(counts):
    ratios = [0.01, 0.03, 0.02, 0.10]
    sparsities = owl_sparsities(ratios, counts, TARGET, LAMBDA)
    assert weighted_mean(sparsities, counts) == pytest.approx(TARGET, abs=EXACT)
    assert all(TARGET - LAMBDA - EXACT <= s <= TARGET + LAMBDA + EXACT for s in sparsities)
    order = sorted(range(len(ratios)), key=ratios.__getitem__)  # more outliers → lower sparsity
    assert [sparsities[i] for i in order] == sorted(sparsities, reverse=True)


def test_one_outlier_block_among_many_is_clipped_to_lambda_and_the_rest_redistributed():
    # OWL's plain shift would give the outlier block a density 1 - S + 2λ(1 - 1/n): 0.14 below the target.
    ratios, counts = [0.01] * 7 + [0.5], [1] * 8
    sparsities = owl_sparsities(ratios, counts, TARGET, LAMBDA)
    assert sparsities[-1] == pytest.approx(TARGET - LAMBDA, abs=EXACT)
    assert weighted_mean(sparsities, counts) == pytest.approx(TARGET, abs=EXACT)
    assert all(s == pytest.approx(TARGET + LAMBDA / 7, abs=EXACT) for s in sparsities[:-1])


def test_equal_outlier_ratios_give_the_uniform_allocation():
    assert owl_sparsities([0.02] * 3, [5, 6, 7], 0.5, LAMBDA) == [0.5] * 3


def test_bounds_stay_inside_zero_and_one():
    sparsities = owl_sparsities([0.0, 0.1, 0.2], [1, 1, 1], 0.03, LAMBDA)
    assert min(sparsities) >= 0.0
    assert weighted_mean(sparsities, [1, 1, 1]) == pytest.approx(0.03, abs=EXACT)


@pytest.mark.parametrize(("values", "words"), [([0.5, 0.5], "2 sparsities for a model of 3"),
                                                 ([0.5, 1.0, 0.5], "block 2"), ([0.5, "x", 0.5], "block 2"),
                                                 ([0.5, -0.1, 0.5], "block 2")])
def test_explicit_sparsities_are_checked(values, words):
    with pytest.raises(ValueError, match="--allocation") as error:
        check_explicit_sparsities(values, 3, "mine.json")
    assert words in str(error.value)


# --------------------------------------------------------------------------- jobs through the command line
def run_cli(*args: str, crash: str | None = None, fresh: bool = False) -> subprocess.CompletedProcess:
    """``python -m reconstruct ARGS`` in a process of its own (one thread; ``crash`` sets the crash point;
    ``forked_cli``: forked from a pre-imported server, or a new interpreter with ``fresh``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
    env.pop(CRASH_ENV, None)
    if crash is not None:
        env[CRASH_ENV] = crash
    return run_reconstruct(list(args), env=env, cwd=REPO, timeout=RUN_TIMEOUT_S, fresh=fresh)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-4000:]}"
    return result


def refused_line(result: subprocess.CompletedProcess) -> str:
    """Exit 2 with one ``error:`` line and no traceback; returns the line."""
    assert result.returncode == 2, f"expected exit 2, got {result.returncode}\n{result.stderr[-4000:]}"
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("model") / "llama")


@pytest.fixture(scope="module")
def outlier_model(model, tmp_path_factory) -> Path:
    """The tiny LLaMA with a few input columns of block 2's (index 1) linears scaled up: outlier scores."""
    folder = tmp_path_factory.mktemp("outlier") / "llama"
    folder.mkdir()
    for path in model.iterdir():
        if path.is_file():
            (folder / path.name).write_bytes(path.read_bytes())
    tensors = load_file(folder / "model.safetensors")
    for name in list(tensors):
        if name.startswith("model.layers.1.") and name.endswith("proj.weight"):
            tensors[name] = tensors[name].clone()
            tensors[name][:, :2] *= 40.0  # (out, in): two columns of large weights
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def job_args(model: Path, calib: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--model", str(model), "--calib", str(calib), "--out", str(out), *JOB_FLAGS, *extra]


def test_owl_gives_the_outlier_block_the_lowest_sparsity_and_keeps_the_weighted_mean(
        outlier_model, small_calib_file, tmp_path):
    out = tmp_path / "out"
    ok(run_cli(*job_args(outlier_model, small_calib_file, out, "--sparsity", str(TARGET), "--method", "none",
                         "--allocation", "owl")))
    report = json.loads((out / "reconstruct.json").read_text())
    allocation = report["allocation"]
    targets = allocation["sparsities"]
    assert min(range(len(targets)), key=targets.__getitem__) == 1  # the block given outliers is pruned least
    assert max(allocation["outlier_ratios"]) == allocation["outlier_ratios"][1]
    assert weighted_mean(targets, allocation["param_counts"]) == pytest.approx(TARGET, abs=EXACT)
    assert all(TARGET - LAMBDA - EXACT <= s <= TARGET + LAMBDA + EXACT for s in targets)
    smallest_in = 64  # the tiny LLaMA's narrowest input (hidden size): one weight per row is 1/64
    for block, target in zip(report["blocks"], targets):
        assert block["target_sparsity"] == target
        for achieved in block["sparsity"].values():
            assert target - 1 / smallest_in < achieved <= target
    assert "| target |" in (out / "report.md").read_text()
    status = ok(run_cli("status", str(out))).stdout
    assert "allocation: owl" in status and f"{targets[1]:.3f}" in status


def test_explicit_allocation_file_is_honoured(model, small_calib_file, tmp_path):
    values = [0.3, 0.5, 0.7]
    file = tmp_path / "blocks.json"
    file.write_text(json.dumps(values))
    out = tmp_path / "out"
    ok(run_cli(*job_args(model, small_calib_file, out, "--method", "none", "--allocation", str(file))))
    report = json.loads((out / "reconstruct.json").read_text())
    assert report["allocation"]["sparsities"] == values
    for block, target in zip(report["blocks"], values):
        for achieved in block["sparsity"].values():
            assert target - 1 / 64 < achieved <= target


@pytest.mark.parametrize(("content", "extra", "words"), [
    ("[0.5, 0.5]", [], "2 sparsities for a model of 3 blocks"),
    ("[0.5, 1.0, 0.5]", [], "block 2's sparsity 1.0"),
    ("{not json", [], "not valid JSON"),
    ("[0.5, 0.5, 0.5]", ["--pattern", "2:4"], "unstructured only"),
    (None, ["--pattern", "heads"], "unstructured only"),
    (None, ["--owl-lambda", "1.5"], "--owl-lambda must be in [0, 1)"),
], ids=["count", "range", "json", "nm", "heads-owl", "lambda"])
def test_bad_allocations_are_refused_before_any_work(model, small_calib_file, tmp_path, content, extra, words):
    allocation = "owl"
    if content is not None:
        allocation = str(tmp_path / "blocks.json")
        Path(allocation).write_text(content)
    out = tmp_path / "out"
    line = refused_line(run_cli(*job_args(model, small_calib_file, out, "--method", "none", "--allocation",
                                          allocation, *extra)))
    assert "--allocation" in line or "--owl-lambda" in line
    assert words in line
    assert not out.exists() or not any(out.glob("model-*.safetensors"))


def test_changed_allocation_is_refused_on_resume_naming_the_flag(model, small_calib_file, tmp_path):
    out = tmp_path / "out"
    common = ("--sparsity", "0.6", "--method", "none")
    result = run_cli(*job_args(model, small_calib_file, out, *common, "--allocation", "owl"), crash="statistics:0")
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    line = refused_line(run_cli(*job_args(model, small_calib_file, out, *common, "--allocation", "owl",
                                          "--owl-lambda", "0.05")))
    assert "--owl-lambda" in line


def test_resume_after_the_pre_pass_is_byte_identical_and_does_not_repeat_it(outlier_model, small_calib_file, tmp_path):
    flags = ("--sparsity", "0.7", "--method", "bias-ln", "--recon-steps", "4", "--allocation", "owl")
    reference = tmp_path / "reference"
    ok(run_cli(*job_args(outlier_model, small_calib_file, reference, *flags), fresh=True))  # the other side is forked
    out = tmp_path / "out"
    crashed = run_cli(*job_args(outlier_model, small_calib_file, out, *flags), crash="allocation")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    manifest = Manifest.load(out)
    assert manifest.allocation is not None and manifest.first_unfinished_block() == 0
    # The same crash point again: a resume that ran the pre-pass a second time would die there.
    ok(run_cli(*job_args(outlier_model, small_calib_file, out, *flags), crash="allocation"))
    weights = sorted(path.name for path in reference.glob("*.safetensors"))
    assert weights and weights == sorted(path.name for path in out.glob("*.safetensors"))
    for name in weights:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    ours, theirs = (json.loads((folder / "reconstruct.json").read_text())["allocation"] for folder in (out, reference))
    assert ours == theirs
