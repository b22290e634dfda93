"""Stands in for matplotlib in a test's subprocess that needs no figure: importing it fails, as without the plot extra.

Put ``tests/support/without_matplotlib`` first on the subprocess's ``PYTHONPATH``; the run then writes
``report.md`` and no ``report.png`` (drawing one costs about 2 s of CPU a run, a quarter of a tiny job).
"""

raise ImportError("matplotlib is kept out of this test subprocess (tests/support/without_matplotlib)")
