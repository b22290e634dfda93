"""How a token sequence starts, as the model reads it in use: with the BOS its tokenizer adds, or not.

Many tokenizers (LLaMA-2/3, Mistral, ...) put a beginning-of-sequence token in front of every
input; the model builds its attention sink on it, so block-0 inputs (and every later block's)
differ without it. Every place that makes token windows (calibration from text, ``--calib self``
generation, perplexity windows, zero-shot requests, retraining data) frames them with one
:class:`SequenceFraming`, derived from the tokenizer by :func:`resolve_framing`:

- with a BOS: ``[BOS] + (T - 1)`` text tokens per window of ``T``;
- without: ``T`` text tokens, exactly as before (so such models' outputs do not change).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

BOS_MODES = ("auto", "always", "never")  # --calib-bos: follow the tokenizer, force a BOS, no BOS
PROBE_TEXT = "Hello world, the"  # tokenized with and without special tokens to see what the tokenizer adds


@dataclass(frozen=True)
class SequenceFraming:
    """How every token window starts: ``bos_id`` first and then text, or text only."""

    bos_id: int | None = None  # the token every window starts with; None: windows are text only

    def text_length(self, seq_len: int) -> int:
        """Text tokens in a window of ``seq_len`` tokens (one fewer when the BOS takes the first place)."""
        return seq_len - 1 if self.bos_id is not None else seq_len

    def frame(self, text: torch.Tensor) -> torch.Tensor:
        """Put the BOS in front of every row of text ids: (n, L) → (n, L + 1); unchanged without a BOS."""
        if self.bos_id is None:
            return text  # (n, L)
        bos = torch.full((text.shape[0], 1), self.bos_id, dtype=text.dtype, device=text.device)  # (n, 1)
        return torch.cat([bos, text], dim=1)  # (n, L + 1)

    def prefix(self) -> list[int]:
        """The ids every sequence starts with: ``[bos_id]`` or ``[]``."""
        return [] if self.bos_id is None else [self.bos_id]

    def record(self) -> dict[str, int | None]:
        """What ``reconstruct.json`` and evaluation results record about the framing."""
        return {"bos_id": self.bos_id}

    def describe(self) -> str:
        """A short label for reports: ``BOS (id 1) + text`` or ``text only, no BOS``."""
        return "text only, no BOS" if self.bos_id is None else f"BOS (id {self.bos_id}) + text"


def tokenizer_bos_id(tokenizer) -> int | None:
    """The id a tokenizer puts in front of a text when it adds its special tokens, or None.

    Detected by tokenizing a short text with and without ``add_special_tokens``: a tokenizer that
    adds nothing, or only an EOS at the end, yields None.
    """
    plain = list(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])
    special = list(tokenizer(PROBE_TEXT, add_special_tokens=True)["input_ids"])
    for start in range(len(special) - len(plain) + 1):
        if special[start : start + len(plain)] == plain:
            if start > 1:
                logger.warning("the tokenizer adds %d tokens in front of a text; framing uses the first, id %d",
                               start, special[0])
            return special[0] if start > 0 else None
    bos = getattr(tokenizer, "bos_token_id", None)  # the text itself changed (e.g. a prefix space): trust the ids
    return bos if special and special[0] == bos and (not plain or plain[0] != bos) else None


def resolve_framing(tokenizer, mode: str = "auto") -> SequenceFraming:
    """The framing of every window for ``--calib-bos mode``.

    Args:
        tokenizer: the model's tokenizer.
        mode: ``auto`` (a BOS exactly when the tokenizer adds one), ``always`` (the tokenizer's BOS
            token even if it does not add it) or ``never``.

    Raises:
        ValueError: an unknown mode, or ``always`` for a tokenizer without a BOS token.
    """
    if mode not in BOS_MODES:
        raise ValueError(f"--calib-bos must be one of {', '.join(BOS_MODES)}; got {mode!r}")
    if mode == "never":
        return SequenceFraming(None)
    added = tokenizer_bos_id(tokenizer)
    if mode == "auto" or added is not None:
        return SequenceFraming(added)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise ValueError("--calib-bos always: the model's tokenizer has no BOS token; use --calib-bos auto or never")
    return SequenceFraming(int(bos))
