"""``python -m reconstruct ...`` (used by torchrun) runs the command line."""

from reconstruct.cli import app

app()
