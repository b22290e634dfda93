"""One source per flag: the specs declare their flags, and refusals name them from there."""

from __future__ import annotations

import pytest

from pruners.pattern import SparsityPattern
from reconstruct.config import AllocationSpec, CalibSpec, EvalSpec, JobConfig, PruneSpec, ValidationData
from reconstruct.evaluation.tasks import TaskEvalSpec
from reconstruct.flags import FlagError, flag_name, flag_names, spec_flags
from reconstruct.jobs.retrain_job import RetrainJob
from reconstruct.jobs.sweep import SweepSpec
from reconstruct.methods.spec import ReconSpec
from reconstruct.planner import MemoryBudget
from reconstruct.retrain.spec import RetrainSpec

SPECS = (SparsityPattern, AllocationSpec, CalibSpec, EvalSpec, JobConfig, PruneSpec, ValidationData, TaskEvalSpec,
         RetrainJob, SweepSpec, ReconSpec, MemoryBudget, RetrainSpec)


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.__name__)
def test_every_declared_flag_has_a_name_and_help_once_per_spec(spec):
    flags = [flag for _, flag in spec_flags(spec)]
    assert flags and all(flag.name.startswith("--") and flag.help for flag in flags)
    assert len({flag.name for flag in flags}) == len(flags)


def test_a_refusal_names_the_fields_flag_and_can_be_told_by_another():
    with pytest.raises(FlagError) as refused:
        ReconSpec(lr=0.0)
    assert str(refused.value) == "--lr must be > 0; got 0.0" and refused.value.field == "lr"
    with pytest.raises(FlagError) as refused:
        RetrainSpec(lr=0.0)
    assert str(refused.value) == "--lr must be > 0; got 0.0"
    assert str(refused.value.renamed("--retrain-lr")) == "--retrain-lr must be > 0; got 0.0"  # run's stage


def test_flag_names_label_fingerprint_fields():
    assert flag_names(ReconSpec, "method.")["method.batch_size"] == "--recon-samples-per-step"
    assert flag_name(RetrainSpec, "n_windows") == "--n-samples"
    assert flag_name(SparsityPattern, "scope") == "--mask-scope"  # pruners/ declares it as plain metadata
