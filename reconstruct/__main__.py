"""``python -m reconstruct ...`` (used by torchrun) runs the command line."""

from cli import app

app()
