"""The planner's entry points: plan a job for a loaded model or from a config alone, and check it."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from reconstruct.planner.budget import MemoryBudget
from reconstruct.planner.estimate import PlanInputs, plan_for_tier
from reconstruct.planner.plan import MemoryPlan, log_plan
from reconstruct.planner.probe import probe_model
from reconstruct.planner.tier import choose_stream_tier
from reconstruct.planner.tracing import sequential_groups
from reconstruct.runtime import config_dtype, model_dtype
from reconstruct.modelio.architecture import load_config
from reconstruct.modelio.facts import check_calib_seq_len
from reconstruct.modelio.source import resolve_model
from reconstruct.modelio.architecture import CAUSAL_LM_SUFFIXES
from reconstruct.parallel import distributed

logger = logging.getLogger(__name__)

def plan_job(job, loaded, budget: MemoryBudget | None = None) -> MemoryPlan:
    """The plan of ``job`` for a model already opened by the engine (``LoadedModel``)."""
    stored = config_dtype(loaded.config) or torch.float32
    return _plan(job, loaded.config, loaded.device.type, loaded.dtype, stored, budget or MemoryBudget(),
                 cuda_index=loaded.device.index, layout=loaded.layout)


def check_memory_plan(job, loaded, budget: MemoryBudget | None = None, on_plan=log_plan):
    """Plan ``job``, refuse it when it cannot fit; return it with ``--offload`` resolved.

    The returned job names the stream tier the plan was made for (``--offload auto`` → device, cpu
    or disk), so the engine and the plan agree. ``offload`` is not part of the resume fingerprint.
    A plan that fits goes to ``on_plan`` (default: logged now; the engine keeps it to log after its
    other checks); one that does not is logged at debug level, the refusal saying what matters.

    Raises:
        ValueError: the plan does not fit its budgets; the message names the flags to change.
    """
    try:
        plan = plan_job(job, loaded, budget)
    except ValueError:
        raise
    except Exception as error:  # the plan is advice: a model it cannot probe still runs
        logger.warning("memory plan unavailable (%s: %s); --offload %s decides the tier as before",
                       type(error).__name__, error, job.offload)
        return job
    if not plan.fits:
        log_plan(plan, logging.DEBUG)
        raise ValueError(plan.refusal())
    on_plan(plan)
    return replace(job, offload=plan.stream_tier)


def plan_from_config(job, config_path: Path | None, budget: MemoryBudget | None = None) -> MemoryPlan:
    """The plan of ``job`` from a ``config.json`` alone (no weights needed), or from ``job.model``'s config.

    The device may be one this machine lacks (``--device cuda`` on a laptop): give its memory with
    ``budget.device_bytes``.
    """

    if config_path is not None:
        config_path = Path(config_path).expanduser()
        if config_path.is_dir():
            config_path = config_path / "config.json"
        if not config_path.is_file():
            raise ValueError(f"--config {config_path}: no such file")
        config = _load_config_file(config_path)
    else:

        config = load_config(resolve_model(job.model))
    budget = budget or MemoryBudget()
    device_type, reason = planned_device(job.device, budget.device_bytes)
    check_calib_seq_len(job.calib.seq_len, config)  # --seq-len longer than the context: refused like run
    checkpoint_dtype = config_dtype(config)
    dtype = model_dtype(job.dtype, torch.device(device_type), config)
    plan = _plan(job, config, device_type, dtype, checkpoint_dtype or torch.float32, budget)
    plan.device_reason = reason
    return plan


def planned_device(device: str, gpu_budget: int | None) -> tuple[str, str]:
    """The device type ``reconstruct plan`` plans for, and one line saying why.

    ``--device auto`` plans for a GPU when this machine has one or when ``--gpu-memory`` gives a GPU
    budget (a plan for a GPU elsewhere), else for the CPU.

    Args:
        device: the ``--device`` flag.
        gpu_budget: ``--gpu-memory`` in bytes, or None.
    """
    if device != "auto":
        device_type = _device_type(device)
        if device_type == "cpu" and gpu_budget is not None:
            return device_type, "cpu (--device cpu; --gpu-memory is ignored on the CPU)"
        return device_type, f"{device_type} (--device {device})"
    if torch.cuda.is_available():
        return "cuda", "cuda (--device auto: this machine has a GPU)"
    if gpu_budget is not None:
        return "cuda", "cuda (--device auto with --gpu-memory: a GPU this machine lacks; --device cpu plans for the CPU)"
    return "cpu", "cpu (--device auto: no GPU on this machine; --device cuda --gpu-memory SIZE plans for one)"


def _load_config_file(path: Path):
    import json

    from transformers import AutoConfig


    try:
        data = json.loads(path.read_text())
        model_type = data.pop("model_type")
        config = AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError, OSError) as error:
        raise ValueError(f"--config {path}: transformers cannot read it ({error})") from None
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(name.endswith(CAUSAL_LM_SUFFIXES) for name in architectures):
        raise ValueError(f"--config {path}: {', '.join(architectures)} is not a causal LM")
    return config


def _device_type(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(name).type
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None


def _budgets(device_type: str, budget: MemoryBudget, cuda_index: int | None) -> tuple[int | None, int]:
    import psutil

    host = budget.host_bytes
    if host is None:  # what this process may still take, plus what it holds already (in the plan's baseline)
        host = psutil.virtual_memory().available + psutil.Process().memory_info().rss
    device = budget.device_bytes
    if device is None and device_type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: there is no CUDA device here to measure; give its memory with "
                             "--gpu-memory (e.g. 24GiB) to plan for one")
        free, _ = torch.cuda.mem_get_info(cuda_index or 0)
        device = free
    return device, host


def _plan(job, config, device_type: str, dtype: torch.dtype, stored_dtype: torch.dtype, budget: MemoryBudget,
          cuda_index: int | None = None, layout=None) -> MemoryPlan:
    device_budget, host_budget = _budgets(device_type, budget, cuda_index)
    recon = job.recon if job.recon is not None and job.recon.method != "none" else None
    n_val = job.recon_val_data.n_samples if job.recon_val_data is not None else 0  # extra rows of the streams
    n_samples, seq_len = _samples_of_this_rank(job.calib.n_samples + n_val), job.calib.seq_len
    recon_mb = min(recon.micro_batch, recon.batch_size, n_samples) if recon is not None else 1
    inputs = PlanInputs(
        device_type=device_type, dtype=dtype, stored_dtype=stored_dtype, n_samples=n_samples, seq_len=seq_len,
        micro_batch=min(job.micro_batch, n_samples), recon_micro_batch=recon_mb, pruner=job.prune.pruner,
        pattern=job.prune.pattern, sequential=job.prune.sequential, recon=recon, calib=job.calib.source,
        checkpoint_streams=True, n_streams=job.n_streams, allocation_pass=job.needs_allocation_pass,
        overlap=job.overlap, check_stream=job.check_stream,
    )
    probe = probe_model(config, dtype, seq_len, layout)
    groups = sequential_groups(probe, seq_len) if inputs.sequential else [list(probe.layout.linear_names)]
    traces: dict[str, dict] = {}
    plans: dict[str, MemoryPlan] = {}

    def plan_on(tier: str) -> MemoryPlan:
        if tier not in plans:
            plans[tier] = plan_for_tier(inputs, probe, groups, tier, device_budget, host_budget, traces)
        return plans[tier]

    tier = choose_stream_tier(job.offload, device_type, lambda candidate: plan_on(candidate).fits)
    plan = plan_on(tier)
    if job.offload == "auto":
        plan.tier_note = f"--offload auto chose {tier}" + (" (the fastest tier that fits)" if plan.fits else " (nothing fits)")
    else:
        plan.tier_note = f"--offload {tier}"
    return plan


def _samples_of_this_rank(n_samples: int) -> int:
    """Stream rows this process holds: all of them, or its share under torchrun.

    The rows are the calibration windows and, with ``--recon-val-data``, its windows after them.
    """

    shard = distributed.split_samples(n_samples)
    return shard.stop - shard.start
