"""The command line's entry point (``reconstruct = "cli:app"``); the commands live in ``reconstruct/cli/``."""

from reconstruct.cli import app

if __name__ == "__main__":
    app()
