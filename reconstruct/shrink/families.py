"""Which ``config.json`` keys hold a family's block sizes, and the config of a shrunk model.

A config describes one size for every block, so a shrunk model is expressible only when every block
keeps the same number of heads, key/value heads and MLP channels, and when the family reads the head
size from the config (``head_dim``) rather than deriving it from ``hidden_size / num_attention_heads``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pruners.structured import attention_geometry, structured_count


@dataclass(frozen=True)
class FamilyKeys:
    """Config keys of one ``model_type``; ``heads is None`` when its heads cannot shrink."""

    channels: str  # MLP width: intermediate_size / ffn_dim / n_inner
    heads: str | None = None  # query heads
    kv_heads: str | None = None  # key/value heads
    head_dim: str | None = None  # written explicitly so the size is not derived from hidden / heads
    heads_refusal: str = ""  # why heads cannot shrink (heads is None)


_LLAMA_LIKE = FamilyKeys("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
FAMILIES: dict[str, FamilyKeys] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "opt": FamilyKeys("ffn_dim", heads_refusal="OPT derives the head size from hidden_size / num_attention_heads"),
    "gpt2": FamilyKeys("n_inner", heads_refusal="GPT-2 derives the head size from n_embd / n_head "
                                                "(and computes q, k, v in one fused c_attn)"),
}
# Families whose MLP width is ``intermediate_size`` and whose MLP linears are separate (up/gate, down):
# their channels shrink (checked by the parity matrix: the shrunk model computes the pruned one's
# logits); their heads are not shrunk until the same check covers them (q/k norms over the whole
# projection in OLMo-2, head sizes derived from hidden / heads in others).
for _model_type in ("gemma", "gemma2", "gemma3_text", "granite", "olmo2", "smollm3", "starcoder2", "stablelm",
                    "cohere2"):
    FAMILIES[_model_type] = FamilyKeys("intermediate_size", heads_refusal=f"shrinking {_model_type}'s heads is not "
                                                                          "checked yet")


def family_keys(model_type: str) -> FamilyKeys:
    """The keys of ``model_type``.

    Raises:
        ValueError: a family not in the table.
    """
    if model_type not in FAMILIES:
        raise ValueError(f"--shrink: model type {model_type!r} is not supported (supported: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[model_type]


def check_shrinkable(model_type: str, kind: str) -> None:
    """Refuse, before any work, a shrink the family's config cannot express.

    Args:
        model_type: ``config.model_type``.
        kind: ``"heads"`` or ``"channels"`` (the ``--pattern``); anything else is refused.

    Raises:
        ValueError: one line naming the reason.
    """
    if kind not in ("heads", "channels"):
        raise ValueError(f"--shrink needs --pattern heads or channels (whole groups to delete), got {kind!r}")
    keys = family_keys(model_type)
    if kind == "heads" and keys.heads is None:
        raise ValueError(f"--shrink with --pattern heads: {keys.heads_refusal}, so its heads cannot shrink; "
                         "use --pattern channels")


@dataclass(frozen=True)
class ShrunkSizes:
    """What every block keeps; None = that dimension is unchanged."""

    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    channels: int | None = None


def shrunk_config(config: dict, sizes: ShrunkSizes) -> dict:
    """``config.json`` content with the kept sizes written under the family's keys."""
    keys = family_keys(config.get("model_type", ""))
    updated = dict(config)
    if sizes.channels is not None:
        updated[keys.channels] = sizes.channels
    if sizes.heads is not None:
        check_shrinkable(config.get("model_type", ""), "heads")
        updated[keys.heads] = sizes.heads
        updated[keys.kv_heads] = sizes.kv_heads
        updated[keys.head_dim] = sizes.head_dim
    return updated


def check_run_shrink(kind: str, sparsity: float, config) -> None:
    """``run --shrink``: refuse up front what the shrunk config could not express.

    Args:
        kind: the ``--pattern``.
        sparsity: the ``--sparsity`` (fraction of heads or channels removed per block).
        config: the model's transformers config.

    Raises:
        ValueError: an unstructured pattern, a family whose heads cannot shrink, or (grouped-query
            attention) a number of removed heads that does not split evenly over the key/value groups.
    """

    check_shrinkable(config.model_type, kind)
    if kind != "heads":
        return
    num_heads, num_kv, _ = attention_geometry(config)
    count = structured_count(num_heads, sparsity)
    if num_kv < num_heads and count % num_kv:
        per_kv = num_heads // num_kv
        raise ValueError(
            f"--shrink with --pattern heads: --sparsity {sparsity:g} removes {count} of {num_heads} query heads, which "
            f"does not split evenly over the {num_kv} key/value groups; use a multiple of {num_kv} heads, such as "
            f"--sparsity {num_kv / num_heads:.4g} (one of every {per_kv} query heads per group)"
        )
