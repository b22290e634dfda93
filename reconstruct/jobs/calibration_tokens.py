"""A run's token windows: the calibration windows and ``--recon-val-data``'s, built once and kept in ``--out``.

Seeded windows of a text (``calib.text_sources``) or sampled from the dense model (``--calib self``,
checkpointed after every chunk so Ctrl-C loses little), framed as the tokenizer starts a sequence
(``calib.framing``), saved in the job's state folder with their digest so a resume reads them back.
In a distributed run rank 0 reads or builds them and broadcasts them to every rank.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from calib.self_generated import chunk_length, generate_self_calibration
from calib.stdlib_code import STDLIB_CODE, stdlib_code_text
from calib.text_sources import SELF, read_text, sample_windows, tokenize_text
from reconstruct.atomic import save_safetensors_atomic
from reconstruct.config import MODEL_CHECK_SEED_OFFSET
from reconstruct.jobs.job_state import JobState
from reconstruct.modelio.loaded import LoadedModel
from reconstruct.parallel import distributed
from reconstruct.progress import progress_bar
from reconstruct.state.sampling_checkpoint import load_sampling, partial_path, save_sampling

logger = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration-tokens.safetensors"
VALIDATION_FILE = "validation-tokens.safetensors"  # --recon-val-data's windows
MODEL_CHECK_FILE = "model-check-tokens.safetensors"  # --model-check's judge windows


@dataclass(frozen=True)
class TokenWindows:
    """Which token windows to draw: from ``source``, ``n_samples`` of them, seeded; ``label`` names them in logs."""

    source: str  # a --calib source
    n_samples: int
    seed: int
    label: str  # "calibration", or the flag that asked for them


def calibration_tokens(state: JobState, loaded: LoadedModel) -> torch.Tensor:
    """The (n, T) calibration token ids: read back on resume, else built and saved."""
    calib = state.job.calib
    windows = TokenWindows(calib.source, calib.n_samples, calib.seed, "calibration")
    return distributed.from_main(lambda: _tokens_here(state, loaded, CALIBRATION_FILE, windows))


def validation_tokens(state: JobState, loaded: LoadedModel) -> torch.Tensor:
    """The (m, T) windows of ``--recon-val-data``: read back on resume, else built and saved.

    Drawn as the calibration windows are (same length and framing), with their own seed
    (``ValidationData.seed``).
    """
    val = state.job.recon_val_data
    windows = TokenWindows(val.source, val.n_samples, val.seed(state.job.calib.seed), "--recon-val-data")
    return distributed.from_main(lambda: _tokens_here(state, loaded, VALIDATION_FILE, windows))


def model_check_tokens(state: JobState, loaded: LoadedModel) -> torch.Tensor:
    """The (m, T) judge windows of ``--model-check``: read back on resume, else built and saved.

    Drawn as the calibration windows are (same length and framing) with their own seed; ``self``
    samples the dense input model ``loaded``. Rank 0's alone (the check runs on rank 0).
    """
    job = state.job
    windows = TokenWindows(job.model_check_text, job.model_check_samples, job.calib.seed + MODEL_CHECK_SEED_OFFSET,
                           "--model-check")
    return _tokens_here(state, loaded, MODEL_CHECK_FILE, windows)


def _tokens_here(state: JobState, loaded: LoadedModel, name: str, windows: TokenWindows) -> torch.Tensor:
    """The (n, T) token windows saved as ``name`` in the state folder, or built from ``windows`` and saved."""
    path = state.state_dir / name
    if path.is_file():
        tokens = _load_checked(path)
        if tokens is not None:
            return tokens
        logger.warning("%s is damaged; building the %s tokens again", path, windows.label)
    calib = state.job.calib
    framing = loaded.framing(calib.bos)
    logger.info("%s windows: %s", windows.label, framing.describe())
    if windows.source == SELF:
        tokens = _sample_tokens(state, loaded, path, windows, framing)
    else:
        text = stdlib_code_text() if windows.source == STDLIB_CODE else read_text(windows.source)
        ids = tokenize_text(text, loaded.tokenizer())
        try:
            tokens = sample_windows(ids, windows.n_samples, calib.seq_len, windows.seed, framing=framing)
        except ValueError as error:
            if windows.label == "calibration":
                raise
            raise ValueError(f"{windows.label} {windows.source}: {error}") from None
    state.state_dir.mkdir(exist_ok=True)
    tokens = tokens.contiguous()
    save_safetensors_atomic(path, {"tokens": tokens}, {"tokens_sha256": _tensor_digest(tokens)})
    partial_path(path).unlink(missing_ok=True)
    return tokens


def _sample_tokens(state: JobState, loaded: LoadedModel, path: Path, windows: TokenWindows, framing) -> torch.Tensor:
    """``--calib self`` (or ``--recon-val-data self``): sampled from the dense model, checkpointed after
    every chunk in ``<name>.partial.safetensors`` so a rerun continues where Ctrl-C stopped it."""
    seq_len = state.job.calib.seq_len
    total = windows.n_samples * (seq_len - 1)
    key = {"n_samples": windows.n_samples, "seq_len": seq_len, "seed": windows.seed, "bos": framing.bos_id,
           "chunk": chunk_length(seq_len)}
    checkpoint = partial_path(path)
    resumed = load_sampling(checkpoint, key)
    sampling, seconds_before = resumed if resumed is not None else (None, 0.0)
    done = sampling.tokens_done() if sampling is not None else 0
    if sampling is not None:
        logger.info("continuing self-%s sampling at token %d of %d", windows.label, done, total)
    else:
        logger.info("sampling %d × %d %s tokens from the dense model", windows.n_samples, seq_len, windows.label)
    started = time.monotonic()
    state.state_dir.mkdir(exist_ok=True)

    def save(progress) -> None:
        save_sampling(checkpoint, progress, key, total, seconds_before + time.monotonic() - started)
        state.save_manifest()  # the manifest's elapsed time counts the sampling too

    with progress_bar(desc=f"self-{windows.label.lstrip('-')}", unit="token", total=total, initial=done) as bar:
        return generate_self_calibration(
            loaded.folder, windows.n_samples, seq_len, windows.seed, loaded.device, loaded.dtype,
            framing=framing, on_tokens=bar.update, resume=sampling, on_checkpoint=save,
        )


def _tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.numpy().tobytes()).hexdigest()


def _load_checked(path: Path) -> torch.Tensor | None:
    """Token windows saved with their digest; None if the file is damaged."""
    try:
        with safe_open(path, framework="pt") as handle:
            expected = (handle.metadata() or {}).get("tokens_sha256")
            tokens = handle.get_tensor("tokens")
    except Exception:  # truncated or garbled file: rebuild it
        return None
    return tokens if expected == _tensor_digest(tokens) else None
