"""Command-line options derived from the flags the specs declare (``reconstruct.flags``).

An :class:`Option` is one flag of a command and the spec field it sets. :func:`command` registers a
command from a tuple of options: typer sees one parameter per option (its name, type, default, help
and choices all from the flag), and the command's body receives the parsed values as one dict keyed
by parameter name. From that dict :func:`values` picks a spec's fields, and :func:`command_line`
writes the flags back (the ``--nproc`` relaunch under torchrun, a sweep cell's command line).
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from reconstruct.flags import REQUIRED, Flag, field_default, spec_flags
from reconstruct.retrain.spec import stage_flag_name


@dataclass(frozen=True)
class Option:
    """One flag of a command, and the spec field it sets (none for the command line's own)."""

    flag: Flag
    type: object  # what typer parses: a Literal of the choices, int, Optional[float], ...
    default: object  # the command line's default (REQUIRED: the flag must be given)
    spec: type | None = None
    field: str | None = None

    @property
    def param(self) -> str:
        """The name typer passes the value under: ``--recon-steps`` → ``recon_steps``."""
        return self.flag.name.lstrip("-").replace("-", "_")


def own_option(flag: Flag, kind: type, default=REQUIRED) -> Option:
    """An option of the command line itself (``--nproc``, ``--verbose``): no spec field behind it."""
    kind = Literal[flag.choices] if flag.choices else kind
    return Option(flag, Optional[kind] if default is None else kind, default)


def _cli_type(annotation, spec, field: str) -> type:
    """The type the command line parses for a field annotated ``annotation`` (``str | None`` → ``str``)."""
    if annotation in (str, int, float, bool, Path):
        return annotation
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if str in args:
        return str  # "auto" or a count (--checkpoint-every): the text, parsed by the spec
    if len(args) == 1 and args[0] in (str, int, float, bool, Path):
        return args[0]
    raise TypeError(f"{spec.__name__}.{field}: give its flag a cli_type (the field holds {annotation})")


def _from_field(spec, item: dataclasses.Field, flag: Flag, annotation) -> Option:
    default = flag.cli_default
    if default is None:
        default = None if flag.unset else field_default(item)
    kind = Literal[flag.choices] if flag.choices else flag.cli_type or _cli_type(annotation, spec, item.name)
    return Option(flag, Optional[kind] if default is None else kind, default, spec, item.name)


def spec_options(spec, *names: str, exclude: tuple[str, ...] = ()) -> tuple[Option, ...]:
    """The options of ``spec``'s flagged fields: ``names`` in that order, or every one but ``exclude``."""
    hints = typing.get_type_hints(spec)
    found = {item.name: (item, flag) for item, flag in spec_flags(spec) if item.name not in exclude}
    unknown = set(names) - set(found)
    if unknown:
        raise KeyError(f"{spec.__name__} has no flagged field {sorted(unknown)}")
    chosen = [found[name] for name in names] if names else list(found.values())
    return tuple(_from_field(spec, item, flag, hints[item.name]) for item, flag in chosen)


def stage_options(spec) -> tuple[Option, ...]:
    """``run --retrain-X``: the options of ``spec``'s fields marked ``stage``, renamed with the stage's prefix.

    A field whose ``stage`` names a flag takes that flag's value when not given (``--retrain-seq-len``:
    ``--seq-len``).
    """
    hints = typing.get_type_hints(spec)
    options = []
    for item, flag in spec_flags(spec):
        if not flag.stage:
            continue
        renamed = dataclasses.replace(flag, name=stage_flag_name(flag.name), stage=False)
        if isinstance(flag.stage, str):
            renamed = dataclasses.replace(renamed, unset=True, show_default=flag.stage)
        options.append(_from_field(spec, item, renamed, hints[item.name]))
    return tuple(options)


def _shown(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _show_default(option: Option) -> bool | str:
    flag = option.flag
    if flag.show_default is not None:
        return flag.show_default
    if flag.unset and option.spec is not None:
        default = field_default(next(item for item in dataclasses.fields(option.spec) if item.name == option.field))
        if default is not REQUIRED and default is not None:
            return _shown(default)
    return True


def _declarations(option: Option) -> list[str]:
    flag = option.flag
    boolean = option.type in (bool, Optional[bool])
    names = [f"{flag.name}/--no-{flag.name[2:]}" if boolean and flag.negatable else flag.name]
    return names + ([flag.short] if flag.short else [])


def typer_option(option: Option, with_default: bool = True) -> typer.models.OptionInfo:
    """The ``typer.Option`` of ``option`` (without its default: for an ``Annotated`` parameter)."""
    settings = dict(help=option.flag.help, show_default=_show_default(option), min=option.flag.min)
    if not with_default:
        return typer.Option(*_declarations(option), **settings)
    default = ... if option.default is REQUIRED else option.default
    return typer.Option(default, *_declarations(option), **settings)


def annotated(option: Option):
    """``Annotated[type, typer.Option(...)]``: an option for a command written as a plain typer function."""
    return Annotated[option.type, typer_option(option, with_default=False)]


def command(app: typer.Typer, name: str, options: Iterable[Option]) -> Callable:
    """Register ``body(params)`` on ``app`` as the command ``name``, taking ``options``.

    Typer reads the command's parameters from a signature built from the options; ``body`` gets the
    parsed values as one dict keyed by :attr:`Option.param` (its docstring is the command's help).
    """
    options = tuple(options)
    params = [option.param for option in options]
    if len(set(params)) != len(params):
        raise ValueError(f"{name}: two options share a name: {sorted(p for p in params if params.count(p) > 1)}")

    def register(body: Callable[[dict], None]) -> Callable[[dict], None]:
        def entry(**parsed) -> None:
            return body(parsed)

        entry.__signature__ = inspect.Signature([
            inspect.Parameter(option.param, inspect.Parameter.KEYWORD_ONLY, default=typer_option(option),
                              annotation=option.type)
            for option in options
        ])
        entry.__doc__, entry.__name__ = body.__doc__, body.__name__
        app.command(name)(entry)
        return body

    return register


def values(spec, params: Mapping[str, object], options: Iterable[Option]) -> dict[str, object]:
    """The fields of ``spec`` that ``options`` set, by field name, from the parsed ``params``.

    A value of None (an ``unset`` flag not given, an optional one left out) is left out, so the
    field keeps its own default.
    """
    return {option.field: params[option.param] for option in options
            if option.spec is spec and params.get(option.param) is not None}


def command_line(options: Iterable[Option], params: Mapping[str, object]) -> list[str]:
    """``--name value`` for every option whose parsed value differs from its default (``--x``/``--no-x``)."""
    args: list[str] = []
    for option in options:
        value = params.get(option.param)
        if value is None or value == option.default:
            continue
        if isinstance(value, bool):
            args.append(option.flag.name if value else f"--no-{option.flag.name[2:]}")
        else:
            args += [option.flag.name, str(value)]
    return args


def without(options: Iterable[Option], *drop: Iterable[Option]) -> tuple[Option, ...]:
    """``options`` less those in ``drop`` (by flag name)."""
    names = {option.flag.name for group in drop for option in group}
    return tuple(option for option in options if option.flag.name not in names)


NPROC = own_option(Flag("--nproc", "Data-parallel processes on this machine (one GPU each on CUDA): relaunches "
                        "through torchrun; see docs/distributed.md.", min=1), int, 1)
VERBOSE = own_option(Flag("--verbose", "Debug logging.", negatable=False, short="-v", show_default="off"), bool, False)
PROCESS = (NPROC, VERBOSE)
