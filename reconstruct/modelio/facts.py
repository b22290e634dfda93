"""Facts about a model read from its config and files: its context length, the windows it accepts.

Checked before any work by every command that takes ``--model`` (``run``, ``plan``, ``sweep``,
``retrain``, ``eval``): one line naming the flag and the model's limit, instead of an error deep
inside the forward.
"""

from __future__ import annotations

from reconstruct.modelio.architecture import load_config
from reconstruct.modelio.checkpoint import CheckpointReader
from reconstruct.modelio.source import resolve_model

CONTEXT_LENGTH_FIELDS = ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length")


def context_length(config) -> int | None:
    """The longest sequence the model's position handling accepts, if the config says."""
    for field in CONTEXT_LENGTH_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_calib_seq_len(seq_len: int, config) -> None:
    """Refuse calibration windows (``--seq-len``) longer than the model's context.

    Raises:
        ValueError: one line naming ``--seq-len`` and the model's context length.
    """
    limit = context_length(config)
    if limit is not None and seq_len > limit:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's context length {limit}; use --seq-len {limit} or less")


DEFAULT_EVAL_SEQ_LEN = 2048  # evaluation window when the model's context allows it (Wanda/SparseGPT's)


def default_eval_seq_len(config) -> int:
    """The evaluation window when none is given: the smaller of 2048 and the model's context length."""
    limit = context_length(config)
    return DEFAULT_EVAL_SEQ_LEN if limit is None else min(DEFAULT_EVAL_SEQ_LEN, limit)


def resolve_eval_seq_len(seq_len: int | None, config, flag: str) -> int:
    """``seq_len`` checked against the model's context, or its default when ``None``.

    Args:
        seq_len: Tokens per evaluation window as given, or ``None`` for the default.
        config: The model's transformers config.
        flag: The flag that set it, named in the error (``--max-length``, ``--seq-len``).

    Raises:
        ValueError: one line naming ``flag`` and the model's context length.
    """
    if seq_len is None:
        return default_eval_seq_len(config)
    limit = context_length(config)
    if limit is not None and seq_len > limit:
        raise ValueError(f"{flag} {seq_len} exceeds the model's context length {limit}; use {flag} {limit} or less")
    return seq_len


def model_config(model: str):
    """The transformers config of ``--model`` (resolved to its folder), for checks before any work."""
    return load_config(resolve_model(model))


def check_model_files(model: str) -> None:
    """Refuse ``--model`` when a weights file is missing or damaged (reads the headers only).

    Raises:
        DamagedFileError: the file and what is wrong (truncated: bytes present vs expected).
    """
    CheckpointReader(resolve_model(model)).close()
