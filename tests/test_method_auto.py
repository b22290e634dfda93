"""``--method auto``: one policy, in the config, that run, plan and sweep cells all go through."""

from __future__ import annotations

import pytest

from reconstruct.config import MASKLORA_FROM_SPARSITY, resolve_method


@pytest.mark.parametrize(("sparsity", "expected"), [(0.0, "bias-ln"), (0.5, "bias-ln"), (MASKLORA_FROM_SPARSITY, "masklora"),
                                                    (0.9, "masklora")])
def test_auto_picks_bias_ln_below_the_threshold_and_masklora_from_it(sparsity, expected):
    assert resolve_method("auto", sparsity) == expected


def test_a_named_method_is_kept_at_any_sparsity():
    assert resolve_method("bias", 0.9) == "bias"
    assert resolve_method("none", 0.1) == "none"


def test_build_job_uses_the_config_policy():
    from pathlib import Path

    from cli import OutputOptions, RunOptions, ShapeOptions, build_job

    job = build_job(RunOptions(shape=ShapeOptions(sparsity=0.7), output=OutputOptions(out=Path("o"))))
    assert job.recon.method == "masklora"
