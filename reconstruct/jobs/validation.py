"""Checks of a job against its model that must pass before anything is written to ``--out``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from calib.stdlib_code import STDLIB_CODE
from calib.text_sources import HUB_DATASETS, SELF, check_dataset_available, describe_sources
from pruners.masks import num_pruned
from pruners.pattern import CHANNELS, HEADS, N_OF_M, UNSTRUCTURED
from pruners.schedule import SCHEDULES
from pruners.structured import attention_geometry, is_attention, structured_count
from reconstruct.modelio.architecture import weight_as_out_in
from reconstruct.config import LORAPRUNE_OBJECTIVES, MODEL_CHECK_OFF, JobConfig
from reconstruct.modelio.facts import check_calib_seq_len, resolve_eval_seq_len
from reconstruct.modelio.loaded import LoadedModel
from reconstruct.shrink.families import check_run_shrink
from reconstruct.jobs.loraprune_stage import check_stage_memory
from calib.text_sources import read_text, tokenize_text
from pruners import get_pruner
from pruners.allocation import check_explicit_sparsities

def validate_job(job: JobConfig, loaded: LoadedModel) -> None:
    """Refuse settings the model or the inputs cannot satisfy, each with the flag at fault.

    Raises:
        ValueError: one line naming the flag and what is allowed.
    """
    calib = job.calib
    check_calib_seq_len(calib.seq_len, loaded.config)
    source = calib.source
    if source != SELF and source not in HUB_DATASETS and not Path(source).expanduser().is_file():
        raise ValueError(f"--calib {source}: no such file; use {describe_sources()}")
    for flag, text in (("--calib", source), ("--recon-val-data", job.recon_val_data and job.recon_val_data.source),
                       ("--retrain-data", job.retrain_data), ("--eval", job.evaluation and job.evaluation.data)):
        if text is not None:
            try:
                check_dataset_available(text)
            except ValueError as error:
                raise ValueError(f"{flag} {text}: {error}") from None
    framing = loaded.framing(calib.bos)  # --calib-bos always needs a BOS token
    check_short_text(source, "--calib", calib.seq_len, framing.text_length(calib.seq_len), loaded)
    check_validation_data(job)
    check_model_check_text(job, loaded)
    pattern = job.prune.pattern
    if job.shrink:

        check_run_shrink(pattern.kind, pattern.sparsity, loaded.config)
    validate_prune_options(job, loaded)
    validate_allocation(job, loaded.layout.n_blocks)
    validate_pruning_counts(job, loaded)
    if job.prune.model_level_loraprune:  # its options are checked above

        check_stage_memory(job, loaded)
    if pattern.kind == N_OF_M:
        block = loaded.blocks[0]
        for name in loaded.layout.linear_names:
            in_features = weight_as_out_in(block.get_submodule(name)).shape[1]
            if in_features % pattern.m:
                raise ValueError(
                    f"--pattern {pattern.label}: layer {name} has {in_features} inputs, not a multiple of {pattern.m}"
                )


SHORT_TEXT_BYTES_PER_TOKEN = 64  # a file under this many bytes per needed token is tokenized up front


def check_short_text(source: str, flag: str, seq_len: int, text_tokens: int, loaded: LoadedModel) -> None:
    """Refuse a local text file too short for one window, before the memory plan and any work.

    Only small files are tokenized here (fewer than 64 bytes per token a window needs): a longer
    file holds enough tokens in any real text, and tokenizing it twice would cost seconds.

    Raises:
        ValueError: one line naming ``flag``, the file's token count and ``--seq-len``.
    """
    path = Path(source).expanduser()
    if source == SELF or source in HUB_DATASETS or not path.is_file():
        return
    if path.stat().st_size >= SHORT_TEXT_BYTES_PER_TOKEN * text_tokens:
        return

    count = tokenize_text(read_text(source), loaded.tokenizer()).numel()
    if count <= text_tokens:
        raise ValueError(f"{flag} {source}: the text has {count} tokens, fewer than one window of --seq-len "
                         f"{seq_len} needs; use more text or a shorter --seq-len")


def check_validation_data(job: JobConfig) -> None:
    """Refuse a ``--recon-val-data`` that nothing would use or that holds no text (needs no model).

    Raises:
        ValueError: one line naming ``--recon-val-data`` and what is allowed.
    """
    val = job.recon_val_data
    if val is None:
        return
    if job.recon is None or job.recon.method == "none":
        raise ValueError("--recon-val-data validates reconstruction: it needs a --method other than none")
    source = val.source
    if source == SELF or source in HUB_DATASETS:
        return
    path = Path(source).expanduser()
    if not path.is_file():
        raise ValueError(f"--recon-val-data {source}: no such file; use {describe_sources()}")
    if not path.read_text(encoding="utf-8", errors="replace").strip():
        raise ValueError(f"--recon-val-data {source}: the file holds no text")


def check_model_check_text(job: JobConfig, loaded: LoadedModel) -> None:
    """Refuse a ``--model-check`` text that does not exist, is unreachable, or is too short for one window.

    Raises:
        ValueError: one line naming ``--model-check`` and what is allowed.
    """
    text = job.model_check_text
    if text is None or text in (SELF, STDLIB_CODE):
        return
    if text not in HUB_DATASETS and not Path(text).expanduser().is_file():
        raise ValueError(f"--model-check {text}: no such file; use {MODEL_CHECK_OFF}, {STDLIB_CODE}, "
                         f"{describe_sources()}")
    try:
        check_dataset_available(text)
    except ValueError as error:
        raise ValueError(f"--model-check {text}: {error}") from None
    framing = loaded.framing(job.calib.bos)
    check_short_text(text, "--model-check", job.calib.seq_len, framing.text_length(job.calib.seq_len), loaded)


def validate_prune_options(job: JobConfig, loaded: LoadedModel) -> None:
    """``--cycles``, ``--cycle-schedule`` and the structured patterns against the model's config."""
    prune = job.prune

    get_pruner(prune.pruner, blocksize=prune.blocksize, percdamp=prune.percdamp, loraprune_steps=prune.loraprune_steps,
               loraprune_rank=prune.loraprune_rank, loraprune_lr=prune.loraprune_lr)
    if prune.cycles < 1:
        raise ValueError(f"--cycles must be >= 1, got {prune.cycles}")
    if prune.loraprune_objective not in LORAPRUNE_OBJECTIVES:
        raise ValueError(f"--loraprune-objective must be one of {', '.join(LORAPRUNE_OBJECTIVES)}, "
                         f"got {prune.loraprune_objective!r}")
    if prune.model_level_loraprune and prune.cycles != 1:
        raise ValueError("--loraprune-objective model prunes on its own schedule over --loraprune-steps; "
                         f"leave --cycles at 1 (got {prune.cycles})")
    if prune.cycle_schedule not in SCHEDULES:
        raise ValueError(f"--cycle-schedule must be one of {', '.join(SCHEDULES)}, got {prune.cycle_schedule!r}")
    pattern = prune.pattern
    if pattern.kind != HEADS:
        return
    num_heads, _, _ = attention_geometry(loaded.config)
    attention = [name for name in loaded.layout.linear_names if is_attention(name)]
    if len(attention) < 4:
        raise ValueError(
            f"--pattern heads needs separate q, k, v and output projections; {loaded.config.model_type} has "
            f"{', '.join(attention) or 'no attention linears'} (a fused q/k/v projection such as GPT-2's c_attn "
            "is not supported); use --pattern channels or unstructured"
        )
    removed = structured_count(num_heads, pattern.sparsity)
    if removed >= num_heads:
        raise ValueError(
            f"--sparsity {pattern.sparsity:g} with --pattern heads removes {removed} of the {num_heads} heads of every "
            "block; it must leave at least one"
        )


def validate_allocation(job: JobConfig, n_blocks: int) -> None:
    """``--allocation`` against the pattern and the model: unstructured only, one file value per block.

    N:M and structured patterns keep one sparsity for every block (OWL's N:M variant, which varies N
    per block, and per-block head / channel fractions are not implemented).

    Raises:
        ValueError: one line naming ``--allocation`` and what is allowed.
    """
    allocation, pattern = job.prune.allocation, job.prune.pattern
    if allocation.uniform:
        return
    if pattern.kind != UNSTRUCTURED:
        raise ValueError(f"--allocation {allocation.file or allocation.kind} works with --pattern unstructured only "
                         f"(not {pattern.label}); use --allocation uniform with N:M, heads or channels")
    if allocation.kind == "file":

        check_explicit_sparsities(list(allocation.sparsities), n_blocks, allocation.file)


def validate_pruning_counts(job: JobConfig, loaded: LoadedModel) -> None:
    """Refuse a non-zero ``--sparsity`` that rounds to removing nothing (or everything), with the count.

    Heads and channels round to whole groups per block; unstructured sparsity rounds down per row
    (``--mask-scope row``) or per layer. Unstructured settings are refused only when every layer
    rounds to nothing: a run that prunes some layers is a choice, one that prunes none is a mistake.

    Raises:
        ValueError: naming ``--sparsity``, the count it rounded to and the smallest value that prunes.
    """
    pattern = job.prune.pattern
    if pattern.sparsity <= 0 or pattern.kind == N_OF_M:
        return
    block = loaded.blocks[0]
    shapes = {name: tuple(weight_as_out_in(block.get_submodule(name)).shape) for name in loaded.layout.linear_names}
    if pattern.kind in (HEADS, CHANNELS):
        if pattern.kind == HEADS:
            total, what = attention_geometry(loaded.config)[0], "heads"
        else:  # MLP channels: the inputs of the MLP's output projection, its widest input
            total, what = max(cols for name, (_, cols) in shapes.items() if not is_attention(name)), "channels"
        removed = structured_count(total, pattern.sparsity)
        if removed == 0:
            raise ValueError(
                f"--sparsity {pattern.sparsity:g} with --pattern {pattern.kind} rounds to 0 of the {total} {what} of "
                f"every block: nothing would be pruned; use --sparsity {0.5 / total:.4g} or more (1 of {total})"
            )
        if removed >= total:
            raise ValueError(
                f"--sparsity {pattern.sparsity:g} with --pattern {pattern.kind} rounds to all {total} {what} of every "
                f"block; use --sparsity below {(total - 0.5) / total:.4g} to leave at least one"
            )
        return
    if pattern.kind != UNSTRUCTURED:
        return
    per_row = pattern.scope == "row"
    sizes = [cols if per_row else rows * cols for rows, cols in shapes.values()]  # weights each count rounds over
    if all(num_pruned(size, pattern.sparsity) == 0 for size in sizes):
        unit = "row" if per_row else "layer"
        raise ValueError(
            f"--sparsity {pattern.sparsity:g} rounds to 0 weights removed per {unit} in every layer (the largest "
            f"{unit} has {max(sizes)} weights): nothing would be pruned; use --sparsity {1 / max(sizes):.3g} or more"
        )


def resolve_evaluation(job: JobConfig, config) -> JobConfig:
    """``job`` with its ``--eval`` window resolved against the model (see :func:`resolve_eval_seq_len`)."""
    if job.evaluation is None:
        return job
    seq_len = resolve_eval_seq_len(job.evaluation.seq_len, config, "--max-length")
    return replace(job, evaluation=replace(job.evaluation, seq_len=seq_len))
