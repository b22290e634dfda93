"""The command line: ``reconstruct run | retrain | plan | eval | sweep | inspect | status | shrink``.

Each module registers its commands on the one app (``main.py``); importing this package registers
them all. Options come from the specs' flags (``reconstruct.flags``, ``options.py``): the command line
parses, builds the specs, maps user errors to one line and exit code 2 (``errors.py``), and holds no
other logic.
"""

from collections.abc import Sequence

from typer.main import get_command

from reconstruct.cli import evaluate, folders, plan, retrain, run, sweep  # noqa: F401 (each registers its commands)
from reconstruct.cli.main import app

ORDER = ("run", "plan", "eval", "status", "sweep", "shrink", "inspect", "retrain")  # as --help lists them
app.registered_commands.sort(key=lambda info: ORDER.index(info.name))



def parse_args(command: str, args: Sequence[str]) -> dict:
    """The values ``command`` parses from ``args``, as its body receives them (old flag names not rewritten)."""
    return get_command(app).commands[command].make_context(command, list(args)).params


__all__ = ["app", "parse_args"]
