"""``--method auto``: one policy, in the config, that run, plan and sweep cells all go through."""

from __future__ import annotations

from reconstruct.methods.spec import resolve_method


def test_auto_picks_masklora_whatever_the_pattern():
    assert resolve_method("auto") == "masklora"


def test_a_named_method_is_kept_at_any_sparsity():
    assert resolve_method("bias") == "bias"
    assert resolve_method("none") == "none"


def test_build_job_uses_the_config_policy():
    from reconstruct.cli import parse_args
    from reconstruct.cli.job_options import build_job

    job = build_job(parse_args("run", ["--sparsity", "0.7", "--out", "o"]))
    assert job.recon.method == "masklora"


def test_the_spec_default_is_what_the_command_lines_default_runs():
    from reconstruct.flags import flag_of
    from reconstruct.methods.spec import ReconSpec

    assert ReconSpec().method == resolve_method(flag_of(ReconSpec, "method").cli_default) == "masklora"
