"""A run's activation streams in its job state: which cache tier holds them, and their checkpoint read back.

The tier: ``--offload`` unless ``auto``, else the fastest that fits (``planner.tier``, the rule the
memory plan applies too). The checkpoint: the full streams after some block, written by the job state
(``JobState.block_done``); a resume reads the latest intact one and continues after its block.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from calib.activations import ActivationStream
from reconstruct.config import JobConfig
from reconstruct.modelio.loaded import LoadedModel
from reconstruct.parallel import distributed
from reconstruct.planner.tier import choose_stream_tier, streams_fit_free_memory
from reconstruct.state.manifest import Manifest, verify_stream_checkpoint

logger = logging.getLogger(__name__)


def stream_tier(job: JobConfig, loaded: LoadedModel, n_tokens: int) -> str:
    """The activation-cache tier: ``--offload`` unless ``auto``, else the fastest that fits.

    ``run`` resolves ``auto`` to the memory plan's tier before the state is opened, so ``auto``
    is left here only when no plan could be made; the rule is ``planner.tier``'s either way.

    Args:
        job: the job (``--offload``, the streams it carries).
        loaded: the model (hidden size, dtype, device).
        n_tokens: tokens of this rank's rows (samples × sequence length).
    """
    stream_bytes = job.n_streams * n_tokens * loaded.hidden_size * torch.finfo(loaded.dtype).bits // 8
    return choose_stream_tier(job.offload, loaded.device.type, streams_fit_free_memory(stream_bytes, loaded.device))


def named_streams(sparse: ActivationStream, dense: ActivationStream | None) -> dict[str, ActivationStream]:
    """The streams a job carries, by their checkpoint names (no dense stream for a plain prune)."""
    return {"sparse": sparse} if dense is None else {"sparse": sparse, "dense": dense}


def restore_streams(manifest: Manifest, out: Path, sparse: ActivationStream, dense: ActivationStream | None) -> int:
    """Load the latest intact activation checkpoint into the streams; return the first block still to compute.

    Checkpoints hold the full streams. In a distributed run rank 0 reads the file and sends every
    rank its rows, so a job may resume with a different number of processes.
    """
    shard = distributed.local_shard(sparse.n_samples)  # this rank's rows of the full streams
    tensors: dict[str, torch.Tensor] = {}

    def read_checkpoint() -> int:
        if not verify_stream_checkpoint(manifest, out):
            return 0
        after = int(manifest.stream_checkpoint["after_block"])
        if any(record.status != "done" for record in manifest.blocks[: after + 1]):
            logger.warning("a block before the activation checkpoint must be recomputed: starting from block 1")
            return 0
        tensors.update(load_file(out / manifest.stream_checkpoint["file"]))
        expected = (shard.total, *sparse.shape[1:])
        for values in tensors.values():
            if tuple(values.shape) != expected:
                raise ValueError(f"activation checkpoint has shape {tuple(values.shape)}, expected {expected}")
        return after + 1

    start = distributed.from_main(read_checkpoint)
    if start:
        for name, stream in named_streams(sparse, dense).items():
            stream.load(distributed.scatter_rows(tensors.get(name), shard, stream.shape[1:], stream.dtype))
        logger.info("resuming at block %d of %d", start + 1, manifest.n_blocks)
    return start
