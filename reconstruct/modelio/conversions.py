"""Checkpoint keys as transformers reads them: its renamings applied, its tensor conversions refused by name.

transformers 5 converts some checkpoints while loading (and back while saving): it renames keys
(GPT-NeoX's ``embed_out.`` is the module ``lm_head.``) and builds some tensors from several stored
ones (per-expert ``mlp.experts.0.gate_proj.weight`` ... stacked into ``mlp.experts.gate_up_proj``).
The lazy block reader follows the renamings, so a key is found under the name the module has; a
tensor conversion it cannot follow one tensor at a time is refused up front, naming the conversion,
instead of blaming the checkpoint for missing keys. Stacked experts that ``modelio.experts`` unstacked are
not converted: the skeleton has one linear per stored tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Conversions:
    """The key renamings and tensor conversions transformers applies when loading one model."""

    renamings: tuple[tuple[str, str], ...]  # (regex on a checkpoint key, replacement)
    tensor_conversions: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]  # (source patterns, target patterns)


def model_conversions(model: nn.Module) -> Conversions:
    """What transformers converts when it loads ``model``'s checkpoint (nothing on older releases)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # a transformers release without checkpoint conversions
        return Conversions((), ())
    renamings, conversions = [], []
    for transform in get_model_conversion_mapping(model):
        sources = tuple(getattr(transform, "_original_source_patterns", None) or transform.source_patterns)
        targets = tuple(getattr(transform, "_original_target_patterns", None) or transform.target_patterns)
        if isinstance(transform, WeightRenaming) and len(targets) == 1:
            renamings += [(source, targets[0]) for source in sources]
        else:
            conversions.append((sources, targets))
    return Conversions(tuple(renamings), tuple(conversions))


def _pattern(source: str) -> re.Pattern:
    """A converter's source pattern (``*`` stands for an expert index) as a regex."""
    return re.compile(re.escape(source).replace(r"\*", r"\d+"))


def renamed_keys(checkpoint_keys: list[str], conversions: Conversions) -> dict[str, str]:
    """``{name the module has: checkpoint key}`` for every checkpoint key a renaming changes."""
    renamed: dict[str, str] = {}
    for key in checkpoint_keys:
        name = key
        for source, target in conversions.renamings:
            name = re.sub(source, target, name)
        if name != key:
            renamed[name] = key
    return renamed


def refuse_tensor_conversions(checkpoint_keys: list[str], conversions: Conversions, model_type: str,
                              model: str, model_keys: list[str]) -> None:
    """Refuse a checkpoint whose tensors transformers builds from several stored ones.

    Only conversions into tensors the skeleton still has count: stacked experts that
    ``modelio.experts`` unstacked read their per-expert tensors one to one.

    Raises:
        ValueError: naming the conversion (stored patterns → module tensor).
    """
    for sources, targets in conversions.tensor_conversions:
        built = [_pattern(target) for target in targets]
        if not any(p.search(key) for p in built for key in model_keys):
            continue
        patterns = [_pattern(source) for source in sources]
        hit = next((key for key in checkpoint_keys if any(p.search(key) for p in patterns)), None)
        if hit is None:
            continue
        raise ValueError(
            f"--model {model}: transformers converts this {model_type} checkpoint's tensors when it loads it "
            f"({' + '.join(sources)} → {', '.join(targets)}; first stored tensor: {hit}); the streaming engine "
            "reads one stored tensor per module tensor and does not apply that conversion, so this family is "
            "not supported yet"
        )
