"""``reconstruct status | shrink | inspect``: read or rewrite a folder a job wrote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from reconstruct.cli.main import app, setup_logging
from reconstruct.cli.errors import guarded
from reconstruct.cli.options import VERBOSE, annotated
from reconstruct.cli.run import echo_shrunk
from reconstruct.reporting.inspect import format_table, inspect_folder
from reconstruct.reporting.status import describe_job
from reconstruct.shrink import shrink_folder
from reconstruct.state.out_folder import check_out_folder


@app.command("status")
def status(out: Annotated[Path, typer.Argument(help="A job's output folder.")]) -> None:
    """Blocks done / total, elapsed and estimated time left, and the job's settings."""

    def show():

        typer.echo(describe_job(out))

    guarded(show)


@app.command("shrink")
def shrink_model_folder(
    folder: Annotated[Path, typer.Argument(help="A model folder whose heads or MLP channels are zeroed (a reconstruct run output, or any folder: all-zero groups are found).")],
    out: Annotated[Path, typer.Option(help="The new, smaller model folder (an interrupted shrink there resumes).")],
    verbose: annotated(VERBOSE) = VERBOSE.default,
) -> None:
    """Delete removed heads/channels: smaller matrices and config that stock transformers loads, same function."""
    setup_logging(verbose)

    def write():

        check_out_folder(out)
        echo_shrunk(out, shrink_folder(folder, out))

    guarded(write, files_flag="FOLDER", out=out)


@app.command("inspect")
def inspect_model_folder(
    folder: Annotated[Path, typer.Argument(help="A Hugging Face model folder (pruned or dense).")],
    nm: Annotated[Optional[str], typer.Option(help="Check N:M compliance, e.g. 2:4: at most N non-zeros in every M weights along the input.", show_default="no check")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.", show_default="off")] = False,
    layers: Annotated[bool, typer.Option("--layers", help="One row per layer, not only per block.", show_default="off")] = False,
) -> None:
    """Sparsity per block of a model folder (per layer with --layers), read tensor by tensor; N:M compliance with --nm."""

    def show():

        result = inspect_folder(folder, nm)
        typer.echo(json.dumps(result, indent=2) if as_json else format_table(result, per_layer=layers))

    guarded(show, files_flag="FOLDER")
