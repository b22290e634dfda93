"""Whether jobs run by the tests draw the report's figures.

Drawing ``report.png`` (importing matplotlib, laying out, encoding the PNG) costs a tiny job about as
much as its block loop, and hundreds of tests run whole jobs. So jobs run by the tests draw no
figures, exactly as without the optional ``plot`` extra (the report says how to get them), except in
the tests that check figures: a test marked ``figures``, or a module that sets ``DRAWS_FIGURES = True``.
``tests/conftest.py`` keeps that decision in ``WANTED``; jobs in the test process read it directly,
and ``forked_cli`` hands it to the forked command lines. Fresh interpreters (``fresh=True``,
``torchrun``) draw as a user's runs do.
"""

from __future__ import annotations

import importlib
from typing import Callable

# The modules that import matplotlib through ``load_matplotlib`` (each binds its own name).
MATPLOTLIB_USERS = ("reconstruct.reporting.plots", "reconstruct.reporting.loraprune_report",
                    "reconstruct.reporting.retrain_report")
WANTED = {"on": False}  # set by tests/conftest.py for the test that runs now


def draw_only_when(wanted: Callable[[], bool], setattr_=setattr) -> None:
    """Make every module that draws find matplotlib only while ``wanted()`` is true.

    ``setattr_``: how to patch (``pytest.MonkeyPatch.setattr`` to undo it later; plain ``setattr`` in a
    process that ends with its job).
    """
    from reconstruct.reporting import plots

    real = plots.load_matplotlib

    def load_when_wanted():
        return real() if wanted() else None

    for name in MATPLOTLIB_USERS:
        setattr_(importlib.import_module(name), "load_matplotlib", load_when_wanted)
