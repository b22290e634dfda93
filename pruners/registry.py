"""Pruners by name: the one place the CLI's ``--pruner`` choices come from."""

from __future__ import annotations

from pruners.base import Pruner
from pruners.loraprune import LoRAPrunePruner
from pruners.magnitude import MagnitudePruner
from pruners.sparsegpt import SparseGPTPruner
from pruners.wanda import WandaPruner

_PRUNERS: dict[str, type[Pruner]] = {
    MagnitudePruner.name: MagnitudePruner,
    WandaPruner.name: WandaPruner,
    SparseGPTPruner.name: SparseGPTPruner,
    LoRAPrunePruner.name: LoRAPrunePruner,
}
PRUNER_NAMES: tuple[str, ...] = tuple(_PRUNERS)

# Options each pruner uses. An option known to some pruner is accepted by all and ignored by the
# others (so the engine may pass every pruner option it has); an option no pruner knows is an error.
PRUNER_OPTIONS: dict[str, tuple[str, ...]] = {
    MagnitudePruner.name: (),
    WandaPruner.name: (),
    SparseGPTPruner.name: ("blocksize", "percdamp"),
    LoRAPrunePruner.name: ("loraprune_steps", "loraprune_rank", "loraprune_lr"),
}
_KNOWN_OPTIONS = frozenset(opt for opts in PRUNER_OPTIONS.values() for opt in opts)


def get_pruner(name: str, **options: object) -> Pruner:
    """Build a pruner by name.

    Args:
        name: one of :data:`PRUNER_NAMES` (``magnitude``, ``wanda``, ``sparsegpt``, ``loraprune``).
        **options: pruner options; SparseGPT takes ``blocksize`` (default 128) and ``percdamp``
            (default 0.01); LoRAPrune ``loraprune_steps`` (20), ``loraprune_rank`` (8) and
            ``loraprune_lr`` (2e-2). Options meant for another pruner are ignored; a None value means
            default.

    Raises:
        ValueError: an unknown name, an option no pruner knows, or an option out of range.
    """
    if name not in _PRUNERS:
        raise ValueError(f"--pruner must be one of {', '.join(PRUNER_NAMES)}, got {name!r}")
    unknown = sorted(set(options) - _KNOWN_OPTIONS)
    if unknown:
        raise ValueError(
            f"unknown pruner option(s) {', '.join(unknown)}; known: {', '.join(sorted(_KNOWN_OPTIONS)) or 'none'}"
        )
    used = {k: v for k, v in options.items() if k in PRUNER_OPTIONS[name] and v is not None}
    return _PRUNERS[name](**used)
