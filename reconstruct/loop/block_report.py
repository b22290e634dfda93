"""What happened to one block, as the manifest and ``reconstruct.json`` record it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BlockReport:
    """What happened to one block; stored in the manifest and in ``reconstruct.json``."""

    index: int
    sparsity: dict[str, float] = field(default_factory=dict)  # linear → fraction of zeros
    mse_before: float | None = None  # pruned block on pruned stream vs dense targets, before reconstruction
    mse_after: float | None = None  # same, after reconstruction and merge
    target_mean_square: float | None = None  # mean square of the dense targets: the scale of the MSEs
    trainable_params: int = 0
    block_params: int = 0
    recon_steps: int = 0
    added_biases: list[str] = field(default_factory=list)
    densified_fraction: float = 0.0  # lora only: share of pruned weights that became non-zero
    removed: dict[str, list[int]] = field(default_factory=dict)  # heads/channels: removed heads, kv_heads, channels
    seconds: float = 0.0
    train_error: float | None = None  # training-batch loss over the last evaluation interval (last cycle)
    val_before: float | None = None  # error on the held-out samples before reconstruction (first cycle)
    val_after: float | None = None  # the same after the merge (last cycle), whether kept or undone
    recon_kept: bool | None = None  # guard: a repair is in the written block (None: no guard)
    recon_stopped_at: int | None = None  # guard: step whose parameters were kept, last cycle (0: none)
    target_sparsity: float | None = None  # the block's target (--allocation: its own; else --sparsity)
    # mixture of experts only: {"experts": E, "min_tokens": T, "few_tokens": {expert: tokens}} for the experts
    # that saw fewer than T calibration tokens (pruned by magnitude); empty for a block without experts
    experts: dict = field(default_factory=dict)


def describe_structure(structure) -> str:
    """The groups ``--pattern heads/channels`` removes, in words (not a dataclass repr)."""
    if hasattr(structure, "channels"):
        return (f"{structure.channels} MLP channels per block: output rows of {', '.join(structure.up)}, "
                f"input columns of {structure.down}")
    kv = f" ({structure.num_kv_heads} key/value heads)" if structure.num_kv_heads != structure.num_heads else ""
    return (f"{structure.num_heads} attention heads of {structure.head_dim} per block{kv}: output rows of "
            f"{', '.join((structure.query, *structure.key_value))}, input columns of {structure.output}")
