"""Block IO in the background: read the next block and write the last one while a block computes.

Two helpers of the block loop (``reconstruct.jobs.run_job``), each with a serial twin that runs the
same work in the calling thread (``--no-overlap``: the old order, for comparison and debugging):

- :class:`BlockReads` (``modelio/block_reads.py``, shared with model-level retraining) reads block
  i+1's tensors from the shards (copied out of the memory map, into pinned memory on a GPU) in one
  worker thread while block i computes. safetensors reads and tensor copies release the GIL, so the
  read runs beside the compute. The worker has its own ``CheckpointReader`` and closes it after every
  block, so the mapped pages of earlier blocks do not stay resident.
- :class:`BlockWriter` writes block i's shard (fsync, digest), the activation checkpoint when one is
  due, and the manifest after them, in one worker thread, in block order, while block i+1 computes.
  Every manifest save of the loop happens in that thread, so the durability rule is unchanged: a
  block counts as done once its file is fsynced and the manifest saved after it.

At most one block is read ahead and one written behind: before block i+1's stream snapshot is taken
and its writes handed to the writer, the loop waits for block i's write (one copy of the streams in
flight), and block i+2 is read only once block i+1 was taken. A failed
background read or write is raised in the loop at the next hand-over (or when the loop ends), with
the worker's own exception: a full disk stops the job with the same ``DiskWriteError`` line as a
serial run, and every block written before it stays done.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from reconstruct.modelio.block_reads import BlockReads, ReadBlock  # noqa: F401  (the loop's reads; they live below)

logger = logging.getLogger(__name__)

TIMING_KEYS = ("compute_seconds", "read_wait_seconds", "write_wait_seconds")  # per block, in the manifest stats
IO_KEYS = ("read_seconds", "write_seconds", "checkpoint_seconds")  # how long the IO itself took, per block


@dataclass
class BlockWrite:
    """What the writer persists for one block."""

    index: int
    work: Callable[[], None]  # writes the shard, the checkpoint when due, the manifest (in that order)
    stats: dict = field(default_factory=dict)  # the block's report; the writer's timings are added before the save


class BlockWriter:
    """Runs each block's writes in order, one block behind the compute when ``background``.

    Args:
        background: write in a worker thread; else :meth:`submit` writes before returning.
    """

    def __init__(self, background: bool) -> None:
        self.background = background
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="block-write") if background else None
        self._pending: Future | None = None
        self.carried_wait = 0.0  # write waits not yet charged to a block (charged to the next one)

    def wait(self) -> float:
        """Wait for the write in flight; return the seconds waited. Raises the write's exception."""
        if self._pending is None:
            return 0.0
        started = time.perf_counter()
        pending, self._pending = self._pending, None
        pending.result()
        waited = time.perf_counter() - started
        self.carried_wait += waited
        return waited

    def submit(self, write: BlockWrite, sync: bool = False) -> None:
        """Hand over a block's writes once the previous block's are done (at most one in flight).

        The seconds waited here are recorded in ``write.stats["write_wait_seconds"]`` (with any wait
        carried from a previous ``sync``). ``sync`` waits for this block's writes too (a checkpoint
        that must not overlap the next block's compute); that wait is charged to the next block.
        """
        self.wait()
        write.stats["write_wait_seconds"] = self.carried_wait
        self.carried_wait = 0.0
        if self._pool is None:
            started = time.perf_counter()
            write.work()
            self.carried_wait += time.perf_counter() - started  # serial: the next block waited for it
            return
        self._pending = self._pool.submit(write.work)
        if sync:
            self.wait()

    def close(self, failed: bool) -> float:
        """Wait for the last write and stop the worker; return the seconds waited not charged to a block.

        Args:
            failed: the loop is ending with an exception of its own; a failing write is then logged
                instead of raised, so the loop's exception is the one the user sees.
        """
        try:
            self.wait()
        except Exception as error:  # noqa: BLE001 - re-raised unless the loop's own error is on its way
            if not failed:
                raise
            logger.error("the last block's background write failed too: %s", error)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
        return self.carried_wait


def io_totals(blocks: list[dict], final_write_wait: float = 0.0) -> dict:
    """Sums of the per-block timings and what bounds the job, for ``reconstruct.json``.

    ``bound_by`` names the largest of computing, waiting for reads and waiting for writes: with the
    overlap on, waits are the IO that the compute could not hide; with ``--no-overlap`` they are the
    whole IO time.
    """
    timed = [block for block in blocks if "compute_seconds" in block]
    totals = {key: sum(float(block.get(key, 0.0)) for block in timed) for key in (*TIMING_KEYS, *IO_KEYS)}
    totals["write_wait_seconds"] += final_write_wait
    totals["final_write_wait_seconds"] = final_write_wait
    totals["blocks_timed"] = len(timed)
    totals["overlap"] = sorted({bool(block.get("overlap", False)) for block in timed})
    shares = {"compute": totals["compute_seconds"], "reads": totals["read_wait_seconds"],
              "writes": totals["write_wait_seconds"]}
    totals["bound_by"] = max(shares, key=shares.get) if timed else None
    return totals
