"""One style of progress bar for every phase that can take more than a few seconds.

Bars go to stderr, with a rate and an ETA, and only on the main process of a data-parallel job.
They show when stderr is a terminal; ``RECONSTRUCT_PROGRESS=1`` shows them anyway (logs, CI, tests)
and ``RECONSTRUCT_PROGRESS=0`` hides them. Log records go through tqdm too (``TqdmLoggingHandler``),
so a log line is printed above the bars, never glued onto one.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable

from tqdm.auto import tqdm
from reconstruct.parallel import distributed

PROGRESS_ENV = "RECONSTRUCT_PROGRESS"


def _disabled() -> bool | None:
    """tqdm's ``disable``: True off the main rank or when switched off, None = on a terminal only."""

    if not distributed.is_main():
        return True
    setting = os.environ.get(PROGRESS_ENV, "").strip()
    if setting in ("0", "false", "no"):
        return True
    if setting in ("1", "true", "yes"):
        return False
    return None


class TqdmLoggingHandler(logging.Handler):
    """The one logging handler: each record written through ``tqdm.write``, so it lands above any
    progress bar instead of glued onto it. Writes to the ``sys.stderr`` of the moment (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def progress_bar(iterable: Iterable | None = None, *, desc: str, unit: str, total: int | None = None,
                 initial: int = 0, leave: bool = True) -> tqdm:
    """A tqdm bar over ``iterable`` (or a manual one with ``total``) in the project's style.

    Args:
        iterable: what to iterate over; None for a bar advanced with ``update``.
        desc: the phase, e.g. ``"blocks"`` or ``"self-calibration"``.
        unit: what one step is, e.g. ``"block"`` or ``"token"``.
        total: the number of steps (taken from ``iterable`` when it has a length).
        initial: steps already done (a resumed job).
        leave: keep the finished bar on screen.
    """
    return tqdm(iterable, desc=desc, unit=unit, total=total, initial=initial, leave=leave, file=sys.stderr,
                dynamic_ncols=True, disable=_disabled())
