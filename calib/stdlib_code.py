"""A judge text of another kind, with nothing bundled: Python source of the running interpreter's standard library.

``--model-check`` needs text unlike the calibration text. When the model calibrates on itself
(``--calib self``), any natural-language file would be a guess at what the user cares about, and
the repository would have to carry it with its licence; the standard library's own source is on
every machine that runs this (PSF licence), is text of a clearly different kind (code), and is read
from disk at run time: a few fixed pure-Python modules, in a fixed order, joined by blank lines.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

STDLIB_CODE = "python-stdlib"  # the --model-check value naming this text
# Pure-Python modules with long, stable sources (about 130 KB together in CPython 3.11).
STDLIB_MODULES = ("textwrap", "heapq", "fractions", "statistics", "shlex")


def stdlib_code_text() -> str:
    """The source of :data:`STDLIB_MODULES`, joined by blank lines.

    Raises:
        ValueError: the interpreter ships one of them without its ``.py`` source (a frozen or
            byte-code-only build); the message names the flag and the way out.
    """
    parts = []
    for name in STDLIB_MODULES:
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin) if spec is not None and spec.origin else None
        if origin is None or origin.suffix != ".py" or not origin.is_file():
            raise ValueError(f"--model-check {STDLIB_CODE}: this Python has no source file for the module {name}; "
                             "give --model-check a text file instead")
        parts.append(origin.read_text(encoding="utf-8"))
    return "\n\n".join(parts)
