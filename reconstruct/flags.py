"""One source per flag: a spec's field declares the command-line flag that sets it.

A job spec (``ReconSpec``, ``CalibSpec``, ``RetrainSpec``, ...) owns each of its settings: the
default (the field's own), the choices, and the flag's name and help, in the field's metadata::

    steps: int = flag(64, "--recon-steps", "Optimizer steps per block.", min=0, unset=True)

The command line (``reconstruct.cli``) derives its options from these fields, and a spec's checks
name the flag at fault through :class:`FlagError`, so a flag's name, default, choices and help are
written once. The metadata is a plain dict (``{"flag": {"name": ..., "help": ..., ...}}``, the fields
of :class:`Flag`), so a package that may not import this module (``pruners/``) writes it by hand.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass

FLAG = "flag"  # the metadata key
REQUIRED = MISSING  # flag(REQUIRED, ...): a field without a default


@dataclass(frozen=True)
class Flag:
    """The command-line flag of one spec field."""

    name: str  # "--recon-steps"
    help: str = ""
    choices: tuple[str, ...] | None = None  # the values it takes, when they are a closed set
    min: float | None = None  # the smallest value the command line accepts
    unset: bool = False  # the command line's default is "not given" (None); --help shows the field's default
    show_default: str | None = None  # how --help shows the default, where not the value itself
    negatable: bool = True  # a boolean with a --no-NAME twin
    short: str | None = None  # a one-letter alias ("-v")
    cli_default: object = None  # the command line's default, where the field has none or another (--method auto)
    cli_type: type | None = None  # what the command line parses, where the field holds something else
    stage: bool | str = False  # RetrainSpec: run's retraining stage sets it too, as --retrain-NAME (a flag: its default)

    def field(self, default=REQUIRED, **kwargs) -> dataclasses.Field:
        """A dataclass field with ``default`` that this flag sets (one flag shared by several specs)."""
        metadata = {FLAG: dict(self.__dict__)}
        if default is REQUIRED:
            return dataclasses.field(metadata=metadata, **kwargs)
        return dataclasses.field(default=default, metadata=metadata, **kwargs)


def flag(default, name: str, help: str, **options) -> dataclasses.Field:
    """A dataclass field with ``default`` (or :data:`REQUIRED`), set by the flag ``name``.

    ``options``: the other fields of :class:`Flag` (``choices``, ``min``, ``unset``, ...).
    """
    return Flag(name, help, **options).field(default)


def spec_flags(spec) -> list[tuple[dataclasses.Field, Flag]]:
    """``(field, flag)`` for every field of the dataclass ``spec`` that a flag sets, in field order."""
    return [(item, Flag(**item.metadata[FLAG])) for item in dataclasses.fields(spec) if FLAG in item.metadata]


def flag_of(spec, field: str) -> Flag:
    """The flag that sets ``spec.field``."""
    for item, found in spec_flags(spec):
        if item.name == field:
            return found
    raise KeyError(f"{getattr(spec, '__name__', spec)}.{field} has no flag")


def flag_name(spec, field: str) -> str:
    """The name of the flag that sets ``spec.field`` (``ReconSpec, "steps"`` → ``--recon-steps``)."""
    return flag_of(spec, field).name


def flag_names(spec, prefix: str = "") -> dict[str, str]:
    """``{prefix + field: flag name}`` for every flagged field of ``spec``: labels for a fingerprint's fields.

    A resume refusal names the flag behind a differing fingerprint field (``method.lr`` → ``--lr``):
    ``flag_names(ReconSpec, "method.")`` gives those labels from the spec itself.
    """
    return {prefix + item.name: found.name for item, found in spec_flags(spec)}


def field_default(item: dataclasses.Field):
    """A field's default (its factory's value), or :data:`REQUIRED`."""
    if item.default is not MISSING:
        return item.default
    return item.default_factory() if item.default_factory is not MISSING else REQUIRED


class FlagError(ValueError):
    """A value a spec field may not take, told by the field's flag: ``--lr must be > 0; got 0.0``."""

    def __init__(self, spec, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"{flag_name(spec, field)} {problem}")

    def renamed(self, name: str) -> ValueError:
        """The same refusal told by another flag that sets the field (``run --retrain-lr`` for ``--lr``)."""
        return ValueError(f"{name} {self.problem}")
