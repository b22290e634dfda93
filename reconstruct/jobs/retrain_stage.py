"""``reconstruct run --retrain-steps N``: the global retraining stage after the layer-wise loop.

The layer-wise job finishes first (its folder complete and its manifest finished). The stage then
trains on that folder, and writes the merged model into a staging folder, ``--out/.reconstruct/retrained``
(``retrain_model``, with its checkpoints), so the layer-wise blocks stay as written until the end. Then:

1. the staged block shards and their hashes are recorded in ``--out/.reconstruct/retrain-stage.json``
   (from here on nothing is trained or merged again);
2. ``complete_pending_swap`` moves each staged shard over the layer-wise one (an atomic rename) and
   records its hash and stat in the run's manifest; it is idempotent and also runs when a job is opened,
   so a kill in the middle of the swap is finished before the manifest's block files are checked;
3. the rest of the folder (index, config, report) is written again as ``assemble_output`` does, and
   the stage is marked finished.

With ``--retrain-loss kd`` / ``lm+kd`` the teacher is the run's own ``--model`` (the dense input): its
top-k of every window is computed once by a streamed forward and kept in ``--out/.reconstruct/``
until the merged blocks are staged, so a resume reuses it.

A kill at any point and the same command give the same bytes.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

from calib.text_sources import SELF
from reconstruct.modelio.loaded import LoadedModel, load_model
from reconstruct.modelio.output import REPORT_NAME, STATE_DIR, shard_name
from reconstruct.parallel import distributed
from reconstruct.reporting.report import write_run_report
from reconstruct.retrain.checkpoint import CHECKPOINT_NAME, auto_or_every
from reconstruct.retrain.data import retrain_windows
from reconstruct.retrain.engine import Checkpointing, retrain_model
from reconstruct.retrain.teacher import TEACHER_NAME, teacher_top_k
from reconstruct.atomic import atomic_write_json, sha256_file
from reconstruct.faults import crash_point
from reconstruct.state.manifest import Manifest
from reconstruct.state.retrain_stage_record import STAGING_DIR, complete_pending_swap, read_stage, record_path

logger = logging.getLogger(__name__)


def run_retrain_stage(job, loaded: LoadedModel, state, assemble) -> dict:
    """Retrain the finished layer-wise folder ``job.out`` and swap the merged blocks in.

    Args:
        job: the ``JobConfig`` (``job.retrain``: the ``RetrainSpec``; ``job.retrain_data``: the text).
            Under torchrun every rank calls this and trains on its share of each batch; rank 0 alone
            writes, and the others return ``{"rank", "size"}`` after training.
        loaded: the input model of the run (what ``assemble`` copies the tensors outside the blocks from).
        state: the run's ``JobState`` (its lock is held).
        assemble: ``assemble(job, loaded, state)`` writes index, config and report (``loop.engine``).

    Returns:
        The content of ``reconstruct.json``.
    """
    out = Path(job.out)
    stage = distributed.from_main(lambda: read_stage(out))  # also waits for rank 0's layer-wise folder
    if stage.get("finished"):
        return state.report() if distributed.is_main() else asdict(distributed.world())
    if not stage.get("staged"):
        stage = _train_and_stage(job, loaded, stage)
    if not distributed.is_main():
        return asdict(distributed.world())
    complete_pending_swap(out)
    state.manifest = Manifest.load(out)
    report = assemble(job, loaded, state)
    report = {**report, "retrain": stage["result"], "evaluation_before_retrain": stage.get("layerwise_evaluation")}
    state.update_report(report)
    write_run_report(out, report, job.model)  # report.md with the retraining section
    atomic_write_json(record_path(out), {**read_stage(out), "finished": True})
    shutil.rmtree(out / STATE_DIR / STAGING_DIR, ignore_errors=True)
    return report


def _train_and_stage(job, dense: LoadedModel, stage: dict) -> dict:
    """Train on the layer-wise folder, write the merged model to the staging folder, record it.

    ``dense`` is the run's input model: with ``self`` as the data, the windows are sampled from it, as
    the run's own ``--calib self`` windows are, not from the pruned model being repaired.
    """
    out = Path(job.out)
    staging = out / STATE_DIR / STAGING_DIR
    if not stage and distributed.is_main():  # first session of the stage: keep what the layer-wise report measured
        layerwise = json.loads((out / REPORT_NAME).read_text()).get("evaluation")
        stage = {"layerwise_evaluation": layerwise}
        atomic_write_json(record_path(out), stage)
    # every rank reads the layer-wise blocks from --out (rank 0 has finished writing them)
    layerwise_model = distributed.agree(lambda: load_model(str(out), job.device, job.dtype))
    spec = job.retrain
    framing = layerwise_model.framing(job.calib.bos)
    data = job.retrain_data or job.calib.source
    text_model = dense if data == SELF else layerwise_model  # the tokenizer is the same; self samples the dense model
    tokens = distributed.from_main(lambda: retrain_windows(text_model, data, n_windows=spec.n_windows,
                                                           seq_len=spec.seq_len, seed=spec.seed, framing=framing))
    every = auto_or_every(job.checkpoint_every, spec, layerwise_model)  # k steps here, k blocks in the loop
    teacher = None
    if spec.distils:  # the teacher is the run's dense --model, opened afresh (the loop's skeleton stays as it is)
        dense_model = distributed.agree(lambda: load_model(job.model, job.device, job.dtype))
        teacher = distributed.from_main(lambda: teacher_top_k(dense_model, tokens, spec,
                                                              out / STATE_DIR / TEACHER_NAME))
    result = retrain_model(layerwise_model, spec, data, staging, framing=framing, tokens=tokens,
                           checkpointing=Checkpointing(out / STATE_DIR / CHECKPOINT_NAME, every), teacher=teacher)
    if not distributed.is_main():
        return stage
    n_shards = layerwise_model.layout.n_blocks + 1
    shards = {shard_name(index, n_shards): sha256_file(staging / shard_name(index, n_shards))
              for index in range(layerwise_model.layout.n_blocks)}
    added = {shard_name(int(index), n_shards): names for index, names in result.added_biases.items()}
    stage = {**stage, "result": asdict(result), "staged": {"shards": shards, "added_biases": added}}
    atomic_write_json(record_path(out), stage)
    (out / STATE_DIR / CHECKPOINT_NAME).unlink(missing_ok=True)
    (out / STATE_DIR / TEACHER_NAME).unlink(missing_ok=True)
    crash_point("retrain-staged")
    return stage

