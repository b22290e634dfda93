"""The identity of a ``run`` job: everything that decides its output bytes.

A resume compares it with the one in the manifest and refuses a job whose fingerprint differs, naming
the flags (``state.job_folder.JobFolder.check_same_job``) by ``RUN_FINGERPRINT_FLAGS``, read from the specs
that own the flags: each section is labelled by the spec its values come from (``method.*`` by
``ReconSpec``, ``retrain.*`` by ``RetrainSpec``), so a flag renamed or added in its spec is named rightly
in a refusal with no second edit. Keys that only some jobs carry appear only then, so the fingerprints
of jobs made before a flag existed stay as they were.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict

from calib.stdlib_code import STDLIB_CODE, stdlib_code_text
from pruners.pattern import SparsityPattern
from reconstruct.config import (BOS, MODEL, MODEL_CHECK_AUTO, AllocationSpec, CalibSpec, JobConfig, PruneSpec,
                                ValidationData)
from reconstruct.flags import flag_name, flag_names, spec_flags
from reconstruct.methods.spec import ReconSpec
from reconstruct.modelio.experts import expert_linear_names
from reconstruct.modelio.loaded import LoadedModel
from reconstruct.retrain.spec import RUN_SHARED_FIELDS, RetrainSpec, stage_flag_name
from reconstruct.state.fingerprint import HashCache, text_source_identity
from reconstruct.state.job_diff import FILE_CONTENTS as CONTENTS, SETUP_FLAGS
from reconstruct.state.job_folder import setup_fingerprint

logger = logging.getLogger(__name__)
MODEL_CHECK_KEY = "model_check"  # present only when the check runs (jobs/model_check_stage.py)


def job_fingerprint(job: JobConfig, loaded: LoadedModel, hashes: HashCache | None = None) -> dict:
    """Everything that determines the output bytes; resume refuses a job whose fingerprint differs.

    ``hashes`` remembers the model files' whole-file digests (``fingerprint.HashCache``): without it
    every model file is read in full.
    """
    calib = job.calib
    prune = job.prune
    framing = loaded.framing(calib.bos)
    calibration = {"source": text_source_identity(calib.source), "n_samples": calib.n_samples,
                   "seq_len": calib.seq_len}
    if framing.bos_id is not None:  # only with a BOS: fingerprints of jobs framed as before stay as they were
        calibration["bos_id"] = framing.bos_id
    return {
        # model files, dtype, device type, versions; processes only above 1 (older fingerprints stay valid)
        **setup_fingerprint(loaded, hashes, one_process_recorded=False),
        "model_type": loaded.config.model_type,
        "pruner": prune.pruner,
        "pattern": asdict(prune.pattern),
        "sequential": prune.sequential,
        "sparsegpt": {"blocksize": prune.blocksize, "percdamp": prune.percdamp} if prune.pruner == "sparsegpt" else None,
        # keys only jobs that use them carry, so the fingerprints of older jobs stay as they were
        **({"loraprune": {"steps": prune.loraprune_steps, "rank": prune.loraprune_rank, "lr": prune.loraprune_lr,
                          **({"objective": "model"} if prune.loraprune_objective == "model" else {})}}
           if prune.pruner == "loraprune" else {}),
        **({"cycles": {"cycles": prune.cycles, "schedule": prune.cycle_schedule}} if prune.cycles != 1 else {}),
        **({"heads_per_kv_group": True} if prune.heads_per_kv_group else {}),  # --shrink's head selection
        # mixture-of-experts models only: the fingerprints of models without experts stay as they were
        **({"min_expert_tokens": prune.min_expert_tokens} if expert_linear_names(loaded.blocks[0]) else {}),
        **({"allocation": prune.allocation.fingerprint()} if not prune.allocation.uniform else {}),  # per-block sparsity
        "method": asdict(job.recon) if job.recon is not None else None,
        "calibration": calibration,
        # only with --recon-val-data: the fingerprints of jobs that hold out calibration samples stay as they were
        **({"validation": {"source": text_source_identity(job.recon_val_data.source),
                           "n_samples": job.recon_val_data.n_samples}} if job.recon_val_data is not None else {}),
        "seed": calib.seed,
        "micro_batch": job.micro_batch,
        **({"track_error": True} if job.track_error else {}),  # only when set: older fingerprints stay valid
        **({"retrain": retrain_identity(job)} if job.retrain is not None else {}),  # the global stage, when asked
        # only when the check runs: --model-check off and --method none keep the fingerprints of older jobs
        **({MODEL_CHECK_KEY: model_check_identity(job)} if job.model_check_text is not None else {}),
    }


def model_check_identity(job: JobConfig) -> dict:
    """The fingerprint of ``--model-check``: its judge text (python-stdlib by its content) and window count."""
    text = job.model_check_text
    if text == STDLIB_CODE:  # the interpreter's own source: another Python, another text
        source = {"name": text, "sha256": hashlib.sha256(stdlib_code_text().encode()).hexdigest()}
    else:
        source = text_source_identity(text)
    return {"source": source, "n_samples": job.model_check_samples}


def resumed_fingerprint(recorded: dict, fingerprint: dict, job: JobConfig) -> dict:
    """``fingerprint`` as a resume of the job ``recorded`` compares it.

    A job recorded without the model-level check (started before the check existed, or with
    ``--model-check off``) and resumed with ``--model-check`` at its default continues without the
    check: the key is dropped, and the check runs only where the manifest's fingerprint has it. A
    judge text given explicitly is a changed job, refused naming ``--model-check``.
    """
    if MODEL_CHECK_KEY in fingerprint and MODEL_CHECK_KEY not in recorded and job.model_check == MODEL_CHECK_AUTO:
        logger.info("the job in %s was started without the model-level check; it continues without it", job.out)
        return {key: value for key, value in fingerprint.items() if key != MODEL_CHECK_KEY}
    return fingerprint


def retrain_identity(job: JobConfig) -> dict:
    """The fingerprint of ``run``'s retraining stage: its settings and its training text."""
    return {**job.retrain.fingerprint(), "data": text_source_identity(job.retrain_data or job.calib.source)}


# --------------------------------------------------------------------------- labels
def _retrain_flags_of_run() -> dict[str, str]:
    """``run``'s labels of the retraining stage's settings (``retrain.lr`` → ``--retrain-lr``).

    A field marked ``stage`` is ``--retrain-<flag>``; the step count is ``--retrain-steps``; the fields
    ``RUN_SHARED_FIELDS`` are set by ``run``'s flags of the same name (rank, alpha, seed, --batch-size);
    the others keep ``reconstruct retrain``'s defaults, named by that command's flag.
    """
    def label(name: str, flag) -> str:
        if flag.stage:
            return stage_flag_name(flag.name)
        return flag.name if name in RUN_SHARED_FIELDS else f"reconstruct retrain's {flag.name} (its default)"

    flags = {f"retrain.{item.name}": label(item.name, flag) for item, flag in spec_flags(RetrainSpec)}
    flags["retrain.steps"] = flag_name(JobConfig, "retrain")
    return flags


def _run_flags() -> dict[str, str]:
    """The labels of ``reconstruct run``'s fingerprint (``job_fingerprint``)."""
    loraprune = {f"loraprune.{name.removeprefix('loraprune_')}": flag
                 for name, flag in flag_names(PruneSpec).items() if name.startswith("loraprune_")}
    pattern = flag_name(SparsityPattern, "kind")
    calib_flag = flag_name(CalibSpec, "source")
    validation_flag = flag_name(ValidationData, "source")
    retrain_data = flag_name(JobConfig, "retrain_data")
    return {
        **SETUP_FLAGS,
        "model_type": MODEL.name,
        **{name: flag_name(PruneSpec, name) for name in ("pruner", "sequential")},
        **flag_names(SparsityPattern, "pattern."), "pattern.n": pattern, "pattern.m": pattern,
        "sparsegpt.percdamp": flag_name(PruneSpec, "percdamp"),
        **loraprune,
        "min_expert_tokens": flag_name(PruneSpec, "min_expert_tokens"),
        "cycles": flag_name(PruneSpec, "cycles"), "cycles.cycles": flag_name(PruneSpec, "cycles"),
        "cycles.schedule": flag_name(PruneSpec, "cycle_schedule"),
        "allocation": flag_name(AllocationSpec, "kind"), **flag_names(AllocationSpec, "allocation."),
        "allocation.sha256": flag_name(AllocationSpec, "kind") + CONTENTS,
        "method": flag_name(ReconSpec, "method"), **flag_names(ReconSpec, "method."),
        "method.micro_batch": flag_name(JobConfig, "micro_batch"),  # ReconSpec's is the job's --batch-size
        **flag_names(CalibSpec, "calibration."), "calibration.source.sha256": calib_flag + CONTENTS,
        "calibration.bos_id": BOS.name, "seed": flag_name(CalibSpec, "seed"),
        "validation": validation_flag, **flag_names(ValidationData, "validation."),
        "validation.source.sha256": validation_flag + CONTENTS,
        **{name: flag_name(JobConfig, name) for name in ("micro_batch", "track_error")},
        "heads_per_kv_group": flag_name(JobConfig, "shrink"),  # --shrink's head selection
        "retrain": flag_name(JobConfig, "retrain"), **_retrain_flags_of_run(),
        "retrain.data": retrain_data, "retrain.data.sha256": retrain_data + CONTENTS,
        **{MODEL_CHECK_KEY + suffix: flag_name(JobConfig, "model_check") for suffix in ("", ".source")},
        f"{MODEL_CHECK_KEY}.source.sha256": flag_name(JobConfig, "model_check") + CONTENTS,
        f"{MODEL_CHECK_KEY}.n_samples": flag_name(JobConfig, "model_check_samples"),
    }


RUN_FINGERPRINT_FLAGS: dict[str, str] = _run_flags()
