"""Deterministic crash points, used by the resume tests to kill a job at a chosen instant.

``RECONSTRUCT_CRASH_AT="<point>[@<n>]"`` makes the process SIGKILL itself the ``n``-th time
(default: first) execution reaches ``crash_point(<point>)``. Points are named by the code that
calls them, e.g. ``statistics:1`` (block 1's statistics collected), ``reconstruction:0``,
``write:model-00002-of-00004.safetensors`` (temp file written, not yet renamed),
``write:reconstruct-manifest.json``, ``writer:2`` (block 2 computed, its writes not started; in the
background writer thread with ``--overlap``, after every earlier block's writes). Unset in normal
use: the check is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "RECONSTRUCT_CRASH_AT"
_hits: dict[str, int] = {}


def crash_point(point: str) -> None:
    """SIGKILL this process if ``RECONSTRUCT_CRASH_AT`` names ``point`` and its hit count is reached."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    target, _, nth = spec.partition("@")
    if target != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
