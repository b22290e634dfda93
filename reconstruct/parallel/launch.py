"""``--nproc N``: the same command again as N processes on this machine, through torchrun."""

from __future__ import annotations

import logging
import subprocess
import sys

logger = logging.getLogger(__name__)


def relaunch(nproc: int, args: list[str]) -> int:
    """Run ``python -m reconstruct <args>`` as ``nproc`` processes on this machine through torchrun.

    Returns torchrun's exit status (0 when every rank succeeded).
    """
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "reconstruct", *args,
    ]
    logger.info("starting %d processes: %s", nproc, " ".join(command))
    return subprocess.run(command).returncode
