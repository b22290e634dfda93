"""The typer app every command registers on, its one-line usage errors, ``--version`` and logging.

(Not ``app.py``: the package exports ``app``, the object, which would hide a module of that name.)
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer
from transformers.utils import logging as hf_logging
from typer.core import TyperGroup

from reconstruct import __version__
from reconstruct.cli.aliases import rewrite_deprecated
from reconstruct.cli.errors import EXIT_BAD_INPUT
from reconstruct.host_allocator import unpool_large_allocations
from reconstruct.progress import TqdmLoggingHandler

try:  # typer >= 0.29 carries its own copy of click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer on click
    from click.exceptions import NoArgsIsHelpError, UsageError


class OneLineErrors(TyperGroup):
    """The app's command group: a usage error (unknown choice, missing value) is one ``error:`` line, exit 2."""

    def main(self, args=None, *rest, standalone_mode: bool = True, **kwargs):
        """Click's ``main``, with usage errors printed as one line instead of typer's box.

        Large host allocations are unpooled first, before any command allocates (``host_allocator``).
        Old flag names are rewritten to the new ones, one notice each (``reconstruct.cli.aliases``).
        """

        unpool_large_allocations()
        args, notices = rewrite_deprecated(sys.argv[1:] if args is None else args)
        for notice in notices:
            typer.echo(notice, err=True)
        try:
            code = super().main(args, *rest, standalone_mode=False, **kwargs)
        except NoArgsIsHelpError as error:  # no arguments at all: the help, as before
            error.show()
            code = error.exit_code
        except UsageError as error:
            command = error.ctx.command_path if error.ctx is not None else "reconstruct"
            message = error.format_message().replace("Value error, ", "")
            typer.echo(f"error: {message} (see {command} --help)", err=True)
            code = EXIT_BAD_INPUT
        except typer.Abort:
            typer.echo("Aborted.", err=True)
            code = 1
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: flag names are never cut, whatever the terminal width
    help="Prune an LLM block by block and repair it by layer-wise reconstruction. Converted models "
    "(the default smollm2-135m, .gguf files) are cached in $RECONSTRUCT_CACHE (default ~/.cache/reconstruct).",
    context_settings={"max_content_width": 100},
)


def _print_version(value: bool) -> None:
    if value:

        typer.echo(f"reconstruct {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """The options before the command: ``--version`` (the app's help text is ``app``'s)."""


def setup_logging(verbose: bool) -> None:
    """Log lines above the progress bars; ranks other than 0 log warnings only, unless ``-v``."""
    rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None  # under torchrun
    quiet = rank not in (None, "0") and not verbose

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s " + (f"[rank {rank}] " if rank else "") + "%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[TqdmLoggingHandler()],  # log lines above the progress bars, never glued onto one
    )
    for noisy in ("transformers", "accelerate", "datasets", "huggingface_hub", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
