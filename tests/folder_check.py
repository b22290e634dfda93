"""One check for every model folder the tool writes: it loads cleanly, and the tool's own commands accept it.

``config.json`` and the tensors must agree: stock transformers loads the folder with no missing, no
unexpected and no mismatched keys (a bias a config flag switches on exists in every block), and
``eval``, ``retrain``, ``shrink`` and ``inspect`` accept it. Each command runs as small as it can
(one window of 16 tokens, one retraining step), so the check costs about a second a folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

NOTHING_TO_SHRINK = "no removed heads or channels found"  # shrink's refusal of an unstructured folder


def assert_loads_cleanly(folder: Path) -> None:
    """Stock transformers loads ``folder`` with no missing, unexpected or mismatched keys."""
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(kind), f"{folder}: {kind} {sorted(map(str, info[kind]))[:6]}"
    config = json.loads((folder / "config.json").read_text())
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag) is True:
            assert any(name.endswith(".bias") for name, _ in model.named_parameters()), f"{flag} but no bias"


def _invoke(args: list[str]):
    from cli import app

    return CliRunner().invoke(app, args)


def assert_tools_accept(folder: Path, work: Path, text: Path, *, shrinkable: bool = False) -> None:
    """``eval``, ``retrain``, ``shrink`` and ``inspect`` accept ``folder``.

    Args:
        folder: the model folder under test.
        work: an empty folder for the commands' outputs.
        text: a short text file to evaluate and retrain on.
        shrinkable: the folder has whole heads or channels removed; otherwise ``shrink`` must refuse
            it only for having nothing to remove (exit 2 naming that), never for what it holds.
    """
    cpu = ["--device", "cpu"]
    result = _invoke(["inspect", str(folder), "--json"])
    assert result.exit_code == 0, f"inspect: {result.output[-2000:]}"
    result = _invoke(["eval", "--model", str(folder), "--data", str(text), "--seq-len", "16", "--max-windows", "1", *cpu])
    assert result.exit_code == 0, f"eval: {result.output[-2000:]}"
    result = _invoke(["retrain", "--model", str(folder), "--data", str(text), "--out", str(work / "retrained"),
                      "--method", "bias-ln", "--steps", "1", "--batch", "1", "--seq-len", "16", "--n-windows", "2",
                      "--val", "0", "--allow-dense", *cpu])
    assert result.exit_code == 0, f"retrain: {result.output[-2000:]}"
    assert_loads_cleanly(work / "retrained")
    result = _invoke(["shrink", str(folder), "--out", str(work / "shrunk")])
    if shrinkable:
        assert result.exit_code == 0, f"shrink: {result.output[-2000:]}"
        assert_loads_cleanly(work / "shrunk")
    else:
        assert result.exit_code == 2 and NOTHING_TO_SHRINK in result.output, f"shrink: {result.output[-2000:]}"


def check_written_folder(folder: Path, work: Path, text: Path, *, shrinkable: bool = False) -> None:
    """The whole check: :func:`assert_loads_cleanly` and :func:`assert_tools_accept`."""
    assert_loads_cleanly(folder)
    assert_tools_accept(folder, work, text, shrinkable=shrinkable)
