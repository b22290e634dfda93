"""``--dtype auto`` has one meaning: run (and retrain, which loads the same way), eval and its tasks agree.

A bfloat16 checkpoint on a GPU computes in bfloat16 and on the CPU in float32, whichever command
reads it. No GPU is needed: the device is only named, and each command is stopped at the moment it
has chosen its dtype (run: the loaded model; eval: the model it opens).
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import PIQA_DATA, save_tiny_model
from reconstruct import runtime
from reconstruct.evaluation import perplexity as perplexity_module
from reconstruct.evaluation.perplexity import perplexity
from reconstruct.modelio import loaded as loaded_module
from reconstruct.modelio.loaded import load_model

pytest.importorskip("lm_eval")
from reconstruct.evaluation import tasks as tasks_module  # noqa: E402
from reconstruct.evaluation.tasks import evaluate_tasks  # noqa: E402


class Opened(Exception):
    """Raised where an evaluation opens its model: the dtype is chosen, nothing needs to run."""


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    folder = save_tiny_model("llama", tmp_path_factory.mktemp("bf16") / "llama")
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = "bfloat16"  # what a bfloat16 checkpoint records
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _stop_at_open(opened: dict, key: str):
    """An ``open_lm`` that records the dtype it was asked for under ``key`` and stops the evaluation."""

    def open_lm(folder, device, dtype, stream=None):
        opened[key] = dtype
        raise Opened

    return open_lm


@pytest.mark.parametrize(("device", "expected"), [("cpu", torch.float32), ("cuda", torch.bfloat16)])
@pytest.mark.usefixtures("lm_eval_task_index")  # conftest: lm-eval's task scan once per process
def test_run_and_eval_pick_the_same_dtype_for_auto(bf16_model, small_calib_file, monkeypatch, device, expected):
    named = torch.device(device)
    for module in (loaded_module, perplexity_module, tasks_module, runtime):
        monkeypatch.setattr(module, "resolve_device", lambda name: named)
    opened: dict[str, torch.dtype] = {"run": load_model(str(bf16_model), device, "auto").dtype}  # run, retrain, plan
    monkeypatch.setattr(perplexity_module, "open_lm", _stop_at_open(opened, "eval"))
    monkeypatch.setattr(tasks_module, "open_lm", _stop_at_open(opened, "eval --tasks"))
    with pytest.raises(Opened):
        perplexity(str(bf16_model), str(small_calib_file), seq_len=16, max_windows=1, device=device, dtype="auto")
    with pytest.raises(Opened):
        evaluate_tasks(str(bf16_model), ["piqa"], PIQA_DATA, 2, device=device, dtype="auto")
    assert opened == {"run": expected, "eval": expected, "eval --tasks": expected}
