"""``--method auto``: one policy, in the config, that run, plan and sweep cells all go through."""

from __future__ import annotations

from reconstruct.methods.spec import resolve_method


def test_auto_picks_masklora_whatever_the_pattern():
    assert resolve_method("auto") == "masklora"


def test_a_named_method_is_kept_at_any_sparsity():
    assert resolve_method("bias") == "bias"
    assert resolve_method("none") == "none"


def test_build_job_uses_the_config_policy():
    from pathlib import Path

    from cli import OutputOptions, RunOptions, ShapeOptions, build_job

    job = build_job(RunOptions(shape=ShapeOptions(sparsity=0.7), output=OutputOptions(out=Path("o"))))
    assert job.recon.method == "masklora"
