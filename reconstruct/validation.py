"""Checks of a job against its model that must pass before anything is written to ``--out``."""

from __future__ import annotations

from pathlib import Path

from calib.text_sources import HUB_DATASETS, SELF, describe_sources
from pruners.pattern import N_OF_M
from reconstruct.architecture import weight_as_out_in
from reconstruct.config import JobConfig
from reconstruct.loaded_model import LoadedModel

CONTEXT_LENGTH_FIELDS = ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length")


def context_length(config) -> int | None:
    """The longest sequence the model's position handling accepts, if the config says."""
    for field in CONTEXT_LENGTH_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def validate_job(job: JobConfig, loaded: LoadedModel) -> None:
    """Refuse settings the model or the inputs cannot satisfy, each with the flag at fault.

    Raises:
        ValueError: one line naming the flag and what is allowed.
    """
    calib = job.calib
    limit = context_length(loaded.config)
    if limit is not None and calib.seq_len > limit:
        raise ValueError(f"--seq-len {calib.seq_len} exceeds the model's context length {limit}; use --seq-len {limit} or less")
    source = calib.source
    if source != SELF and source not in HUB_DATASETS and not Path(source).expanduser().is_file():
        raise ValueError(f"--calib {source}: no such file; use {describe_sources()}")
    pattern = job.prune.pattern
    if pattern.kind == N_OF_M:
        block = loaded.blocks[0]
        for name in loaded.layout.linear_names:
            in_features = weight_as_out_in(block.get_submodule(name)).shape[1]
            if in_features % pattern.m:
                raise ValueError(
                    f"--pattern {pattern.label}: layer {name} has {in_features} inputs, not a multiple of {pattern.m}"
                )
