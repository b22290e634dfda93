"""``--model-check``: after the block loop, keep the repaired model or the same model without its repairs.

Every block's repair was kept because its own held-out block error fell; the whole model can still
get worse on text unlike the calibration text. Once every block shard is written and the folder is
loadable (index and config written), the judge (``loop.model_check``) scores the repaired model and
the unrepaired one (same masks, pruned weights before repair: the tensors the loop saved,
``state.model_check_record``) by next-token loss on a few judge windows, and the better stays, as a
whole model. The steps, each recorded in ``.reconstruct/model-check.json`` before the next:

1. judge and decide (``kept`` iff the repaired loss <= the unrepaired loss; a NaN loss never wins);
2. to revert: write each changed block's shard with its unrepaired tensors into ``.reconstruct/reverted``
   and record their digests;
3. ``complete_pending_revert`` moves them over the output shards and records them in the manifest
   (also when the job is opened, so a kill mid-swap is finished on resume);
4. the saved unrepaired tensors and the judge windows are removed; the record stays for the report.

A kill at any step and the same command give the same bytes.
"""

from __future__ import annotations

import logging
import math
import time

from safetensors.torch import load_file

from calib.stdlib_code import STDLIB_CODE, STDLIB_MODULES
from calib.text_sources import SELF
from reconstruct.faults import crash_point
from reconstruct.jobs.calibration_tokens import MODEL_CHECK_FILE, model_check_tokens
from reconstruct.jobs.job_state import JobState
from reconstruct.loop.model_check import judge_losses
from reconstruct.modelio.loaded import LoadedModel, load_model
from reconstruct.modelio.output import ModelFolderWriter
from reconstruct.state.manifest import Manifest
from reconstruct.state.model_check_record import (complete_pending_revert, load_unrepaired, read_record,
                                                  remove_check_files, staging_dir, unrepaired_path, write_record)

logger = logging.getLogger(__name__)

KEPT, REVERTED = "kept", "reverted"


def run_model_check(loaded: LoadedModel, state: JobState) -> dict | None:
    """Judge the finished block shards in ``--out``, revert them when the unrepaired model is better.

    Args:
        loaded: the run's input (dense) model: ``self`` judge windows are sampled from it.
        state: the run's state (rank 0's); its manifest is reloaded when a revert changed block files.

    Returns:
        The check's record for the report (text, windows, both losses, decision), or None when the
        job runs no check (``JobState.model_check_on``).
    """
    if not state.model_check_on:
        return None
    out = state.out
    record = read_record(out)
    if "decision" not in record:
        record = _judge(loaded, state)
        write_record(out, record)
        crash_point("model-check-decided")
    redone = [index for index in range(loaded.layout.n_blocks) if unrepaired_path(out, index).is_file()]
    if record["decision"] == REVERTED and record.get("swapped") and redone:
        # blocks computed again after the revert (a damaged shard of the finished job): revert them alike
        record = {key: value for key, value in record.items() if key not in ("staged", "swapped")}
        record = {**record, "staged": _stage_revert(state, redone)}
        write_record(out, record)
    if record["decision"] == REVERTED and "staged" not in record:
        record = {**record, "staged": _stage_revert(state, range(loaded.layout.n_blocks))}
        write_record(out, record)
        crash_point("model-check-staged")
    if complete_pending_revert(out):
        state.manifest = Manifest.load(out)
    remove_check_files(out)
    (state.state_dir / MODEL_CHECK_FILE).unlink(missing_ok=True)
    return {key: value for key, value in record.items() if key not in ("staged", "swapped")}


def describe_text(source: str) -> str:
    """The judge text as the report names it."""
    if source == SELF:
        return "self (sampled from the dense model)"
    if source == STDLIB_CODE:
        return f"{STDLIB_CODE} (Python source: {', '.join(STDLIB_MODULES)})"
    return source


def _judge(loaded: LoadedModel, state: JobState) -> dict:
    """Score both models on the judge windows; the record of the decision."""
    job = state.job
    started = time.perf_counter()
    tokens = model_check_tokens(state, loaded)  # (m, T)
    output = load_model(str(job.out), job.device, job.dtype)
    repaired, unrepaired = judge_losses(output, tokens, job.micro_batch, lambda index: load_unrepaired(job.out, index))
    decision = KEPT if repaired <= unrepaired else REVERTED  # NaN is never better
    record = {
        "text": describe_text(job.model_check_text), "windows": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]),
        "repaired_loss": repaired, "unrepaired_loss": unrepaired,
        "repaired_perplexity": _perplexity(repaired), "unrepaired_perplexity": _perplexity(unrepaired),
        "decision": decision,
    }  # no time in it: a resumed job's report equals an uninterrupted one's
    logger.info("model-level check on %s: loss repaired %.4f, without the repairs %.4f: repairs %s (%.1fs)",
                record["text"], repaired, unrepaired, decision, time.perf_counter() - started)
    return record


def _perplexity(loss: float) -> float | None:
    """``exp(loss)``; None where it is not a finite number (JSON has no inf or NaN)."""
    value = math.exp(min(loss, 700.0)) if math.isfinite(loss) else math.nan
    return value if math.isfinite(value) else None


def _stage_revert(state: JobState, blocks) -> dict[str, str]:
    """Write each of ``blocks``' shards that its repair changed, with its unrepaired tensors, into the
    staging folder; shard → sha256."""
    out = state.out
    staging = staging_dir(out)
    staging.mkdir(parents=True, exist_ok=True)
    writer = ModelFolderWriter(staging, state.manifest.n_blocks)
    staged: dict[str, str] = {}
    for index in blocks:
        before = load_unrepaired(out, index)
        if not before:
            continue
        name = writer.block_file(index)
        tensors = load_file(out / name)  # the repaired shard
        assert set(before) <= set(tensors), f"{name}: saved unrepaired tensors the shard does not hold"
        staged[name] = writer.write_block(index, {**tensors, **before})
    return staged
