"""The identity of a ``run`` job: everything that decides its output bytes.

A resume compares it with the one in the manifest and refuses a job whose fingerprint differs, naming
the flags (``state.job_folder.JobFolder.check_same_job``). Keys that only some jobs carry appear only
then, so the fingerprints of jobs made before a flag existed stay as they were.
"""

from __future__ import annotations

from dataclasses import asdict

from reconstruct.config import JobConfig
from reconstruct.modelio.loaded import LoadedModel
from reconstruct.state.fingerprint import HashCache, text_source_identity
from reconstruct.state.job_folder import setup_fingerprint


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
    }


def retrain_identity(job: JobConfig) -> dict:
    """The fingerprint of ``run``'s retraining stage: its settings and its training text."""
    return {**job.retrain.fingerprint(), "data": text_source_identity(job.retrain_data or job.calib.source)}
