"""Names of the files in an output folder: the model's own and the files a job keeps about itself.

One list, read by the model-folder writer (which must not copy an earlier job's files into a new
model folder) and by the job-folder tools (manifest, lock, resume state, status).
"""

from __future__ import annotations

# The model: what transformers reads.
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

# The job: its record, its lock, its resume state and its reports.
MANIFEST_NAME = "reconstruct-manifest.json"  # run: settings, per-block progress and hashes
REPORT_NAME = "reconstruct.json"
MARKDOWN_NAME = "report.md"
FIGURE_NAME = "report.png"
LORAPRUNE_FIGURE_NAME = "loraprune.png"
SHRINK_SUMMARY_NAME = "shrink.json"
SHRINK_STATE_NAME = ".shrink-state.json"
LOCK_NAME = ".reconstruct.lock"
STATE_DIR = ".reconstruct"  # resume state: activation checkpoints, calibration tokens, checkpoints

# In STATE_DIR:
HASH_CACHE_NAME = "file-hashes.json"  # model files' whole-file sha256 by stat (fingerprint.HashCache)
RETRAIN_MANIFEST_NAME = "retrain-manifest.json"
RETRAIN_CHECKPOINT_NAME = "retrain-checkpoint.safetensors"
RETRAIN_STAGE_NAME = "retrain-stage.json"
RETRAIN_TEACHER_NAME = "retrain-teacher-top-k.safetensors"  # distillation: the dense teacher's top-k per token
RETRAIN_STAGING_DIR = "retrained"  # the merged model of `run --retrain-steps` before the swap
MODEL_CHECK_NAME = "model-check.json"  # --model-check: the judge's losses, its decision, how far a revert got
UNREPAIRED_DIR = "unrepaired"  # --model-check: each block's tensors before its repair (only those it changed)
REVERT_STAGING_DIR = "reverted"  # --model-check: the unrepaired block shards before the swap

# What a reconstruct job writes about itself (run, retrain, shrink): never carried from an input folder
# that is itself a job's output, where it would describe the earlier job (a stale manifest would even
# make a resume of this job look like another one).
JOB_FILES = frozenset({MANIFEST_NAME, REPORT_NAME, MARKDOWN_NAME, FIGURE_NAME, LORAPRUNE_FIGURE_NAME,
                       SHRINK_SUMMARY_NAME})
