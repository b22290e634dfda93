"""The flags of ``run`` (``plan`` and ``sweep`` take most of them), and the JobConfig they build.

Every option here comes from a spec field (``reconstruct.flags``), grouped as ``--help`` lists them;
``plan`` takes all but :data:`OUTPUT`, ``sweep`` all but :data:`SHAPE`, :data:`OUTPUT` and
:data:`STAGE` (its own grid replaces the shape). :func:`build_job` turns the parsed values into a
``JobConfig``, spec by spec in a fixed order (of several bad flags, the first refused is the one printed).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from pruners.pattern import STRUCTURED, UNSTRUCTURED, SparsityPattern
from reconstruct.cli.options import PROCESS, command_line, spec_options, stage_options, values
from reconstruct.config import AllocationSpec, CalibSpec, EvalSpec, JobConfig, PruneSpec, ValidationData
from reconstruct.evaluation.tasks import TaskEvalSpec
from reconstruct.flags import FlagError, flag_name
from reconstruct.jobs.validation import check_validation_data
from reconstruct.methods.spec import ReconSpec, resolve_method
from reconstruct.planner import MemoryBudget
from reconstruct.retrain.spec import RetrainSpec

logger = logging.getLogger("reconstruct")

MODEL = spec_options(JobConfig, "model")
SHAPE = (*spec_options(PruneSpec, "pruner"), *spec_options(SparsityPattern, "sparsity", "kind"),
         *spec_options(ReconSpec, "method"))  # what to prune and how to repair it: sweep's grid axes
SCOPE = spec_options(SparsityPattern, "scope")
RECON = (*spec_options(ReconSpec, exclude=("method",)), *spec_options(ValidationData),
         *spec_options(JobConfig, "track_error", "model_check", "model_check_samples"))
CALIB = spec_options(CalibSpec)
PRUNE = (*spec_options(PruneSpec, exclude=("pruner",)), *spec_options(AllocationSpec))  # how the pattern is reached
TAKEN = ("model", "out", "force", "shrink", "track_error", "retrain", "retrain_data", "model_check",
         "model_check_samples")  # JobConfig's, in other groups
MACHINE = (*spec_options(JobConfig, exclude=TAKEN), *spec_options(MemoryBudget))  # where and how the job runs
EVALUATION = (*spec_options(EvalSpec), *spec_options(TaskEvalSpec, exclude=("limit",)))  # --limit: EvalSpec's
OUTPUT = (*spec_options(JobConfig, "out", "force"), *EVALUATION, *spec_options(JobConfig, "shrink"))
STAGE = (*spec_options(JobConfig, "retrain", "retrain_data"), *stage_options(RetrainSpec))  # run --retrain-*

RUN = (*MODEL, *SHAPE, *SCOPE, *RECON, *CALIB, *PRUNE, *MACHINE, *OUTPUT, *PROCESS, *STAGE)
PLAN = (*MODEL, *SHAPE, *SCOPE, *RECON, *CALIB, *PRUNE, *MACHINE, *PROCESS, *STAGE)  # not the output folder
SWEEP_SHARED = (*RECON, *SCOPE, *PRUNE, *CALIB, *MODEL, *MACHINE, *PROCESS)  # every cell's flags, in this order


def pick(spec, params: Mapping[str, object]) -> dict[str, object]:
    """The fields of ``spec`` that ``run``'s flags set, from a command's parsed values."""
    return values(spec, params, RUN)


def default_out(params: Mapping[str, object]) -> Path:
    """``--out`` when not given: ``MODEL-PRUNER-SHAPE`` (``smollm2-135m-wanda-s0.5``) in the current folder."""
    model, pruner = pick(JobConfig, params)["model"], pick(PruneSpec, params)["pruner"]
    shape = pick(SparsityPattern, params)
    pattern, sparsity = shape["kind"], shape.get("sparsity", SparsityPattern.sparsity)
    stem = Path(model).stem if model.endswith(".gguf") else Path(model.rstrip("/")).name
    if pattern == UNSTRUCTURED:
        shape = f"s{sparsity:g}"
    elif pattern in STRUCTURED:
        shape = f"{pattern}{sparsity:g}"
    else:
        shape = pattern.replace(":", "of")
    return Path(f"{stem}-{pruner}-{shape}")


def build_job(params: Mapping[str, object]) -> JobConfig:
    """The JobConfig for the flags of ``run`` (``plan``: the same without its output flags)."""
    shape = pick(SparsityPattern, params)
    pattern = SparsityPattern.parse(shape["kind"], shape.get("sparsity"), shape["scope"])
    method = pick(ReconSpec, params)["method"]
    chosen = resolve_method(method)
    if method == "auto":
        logger.info("%s auto chose %s", flag_name(ReconSpec, "method"), chosen)
    top, allocation, calib = pick(JobConfig, params), pick(AllocationSpec, params), pick(CalibSpec, params)
    evaluation, tasks = pick(EvalSpec, params), pick(TaskEvalSpec, params)
    job = JobConfig(
        **{name: value for name, value in top.items() if name not in ("out", "retrain")},
        out=top.get("out") or default_out(params),
        prune=PruneSpec(**pick(PruneSpec, params), pattern=pattern,
                        heads_per_kv_group=top.get("shrink", False) and pattern.kind == "heads",
                        allocation=AllocationSpec.parse(allocation["kind"], allocation["owl_m"],
                                                        allocation["owl_lambda"])),
        calib=CalibSpec(**calib),
        recon=recon_spec(params, chosen),
        evaluation=EvalSpec(**evaluation) if evaluation.get("data") else None,
        task_evaluation=TaskEvalSpec.from_flags(tasks.get("tasks"), tasks.get("task_data"),
                                                evaluation.get("max_windows"), top["micro_batch"]),
        retrain=retrain_stage(params, top.get("retrain", 0)),
        recon_val_data=validation_data(params, calib["n_samples"]),
    )
    check_validation_data(job)
    return job


def recon_spec(params: Mapping[str, object], method: str) -> ReconSpec:
    """The ReconSpec of the reconstruction flags, for ``method`` (``--method auto`` already resolved)."""
    recon = pick(ReconSpec, params)
    if "steps" in recon and "epochs" in recon:
        raise ValueError(f"give {flag_name(ReconSpec, 'steps')} or {flag_name(ReconSpec, 'epochs')}, not both")
    if "source" in pick(ValidationData, params):
        recon["val_fraction"] = 0.0  # the text validates instead: every calibration sample trains
    return ReconSpec(**{**recon, "method": method})


def validation_data(params: Mapping[str, object], calib_samples: int) -> ValidationData | None:
    """The ValidationData of ``--recon-val-data`` / ``--recon-val-samples`` (None without ``--recon-val-data``)."""
    given = pick(ValidationData, params)
    source, samples = flag_name(ValidationData, "source"), flag_name(ValidationData, "n_samples")
    if "source" not in given:
        if "n_samples" in given:
            raise ValueError(f"{samples} counts {source}'s windows: give {source} too")
        return None
    if pick(ReconSpec, params).get("val_fraction") not in (0.0, ReconSpec.val_fraction):
        raise ValueError(f"{source} replaces the held-out share: drop {flag_name(ReconSpec, 'val_fraction')} (every "
                         "calibration sample trains)")
    return ValidationData(given["source"], given.get("n_samples") or ValidationData.default_samples(calib_samples))


def retrain_stage(params: Mapping[str, object], steps: int) -> RetrainSpec | None:
    """The RetrainSpec of ``run --retrain-*`` (None for ``--retrain-steps 0``).

    Rank, alpha, seed, ``--batch-size``, ``--allow-dense-merge`` and (unless ``--retrain-seq-len`` is
    given) ``--seq-len`` are the layer-wise step's; a refusal names the flag that set the field here.
    """
    if not steps:
        return None
    stage = values(RetrainSpec, params, STAGE)
    recon, calib = pick(ReconSpec, params), pick(CalibSpec, params)
    shared = dict(micro_batch=pick(JobConfig, params)["micro_batch"], rank=recon["rank"], alpha=recon["alpha"],
                  seed=calib["seed"], allow_dense_merge=recon["allow_dense_merge"])
    try:
        return RetrainSpec(**{"seq_len": calib["seq_len"], **shared, **stage, "steps": steps})
    except FlagError as error:
        names = {option.field: option.flag.name for option in STAGE if option.spec is RetrainSpec}
        if error.field in stage:
            raise error.renamed(names[error.field]) from None
        raise


def memory_budget(params: Mapping[str, object]) -> MemoryBudget:
    """The MemoryBudget of ``--gpu-memory`` / ``--host-memory`` (None: measure this machine)."""
    return MemoryBudget.from_flags(**pick(MemoryBudget, params))


def relaunch_command(params: Mapping[str, object]) -> list[str]:
    """``run`` and its flags that differ from their defaults, ``--nproc`` left out (what torchrun starts)."""
    return ["run", *command_line((option for option in RUN if option.param != "nproc"), params)]
