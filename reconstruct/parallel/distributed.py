"""Data parallelism over calibration samples with torch.distributed; a no-op in a single process.

Under ``torchrun`` (or ``reconstruct run --nproc N``, which relaunches itself through it) every rank
runs the same block loop on its own contiguous share of the calibration samples:

- rank ``r`` of ``W`` holds samples ``[n*r // W, n*(r+1) // W)`` of the ``n`` calibration windows
  (:func:`split_samples`): contiguous, deterministic, sizes differing by at most one;
- pruner statistics (every tensor of ``LayerStats.state()``, token counts included), MSE sums and
  reconstruction gradients are summed over ranks, so masks and weights match a single process;
- rank 0 alone touches ``--out``: it reads or builds the calibration tokens and the job state and
  broadcasts them (:func:`from_main`), writes the blocks, checkpoints and report; activation
  checkpoints hold the full streams, gathered row by row onto rank 0 (:func:`gather_rows`) and sent
  back on resume (:func:`scatter_rows`), so a job may resume with any number of processes.

The process group uses NCCL when the job runs on CUDA (one GPU per rank, ``cuda:LOCAL_RANK``) and
gloo on the CPU. Every function here is collective when the group is up: all ranks must call it,
in the same order. With no group (``world().size == 1``) each is a cheap no-op.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from reconstruct.runtime import resolve_device

logger = logging.getLogger(__name__)

T = TypeVar("T")
TIMEOUT_ENV = "RECONSTRUCT_DIST_TIMEOUT_MIN"  # minutes a rank waits for rank 0's solo work (from_main: rank 0
DEFAULT_TIMEOUT_MIN = 120  # may hash, sample calibration text from a big model or convert a GGUF meanwhile)
STEP_TIMEOUT_ENV = "RECONSTRUCT_DIST_STEP_TIMEOUT_MIN"  # minutes any other collective may wait: all ranks do
DEFAULT_STEP_TIMEOUT_MIN = 10  # the same work there, so only a hung rank (or a slow checkpoint write) waits
_main_wait_group = None  # gloo group with TIMEOUT_ENV's timeout for waits on rank 0 (set by join)
TRANSFER_CHUNK_BYTES = 64 << 20  # gather/scatter of activation rows: at most this much in flight at once


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank ``rank`` of ``size`` processes."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes."""
        return self.rank == 0


@dataclass(frozen=True)
class Shard:
    """This rank's contiguous rows of a sample axis that is split across ranks."""

    start: int  # first row this rank holds
    stop: int  # one past its last row
    total: int  # rows over all ranks
    bounds: tuple[tuple[int, int], ...]  # (start, stop) of every rank, in rank order

    @property
    def size(self) -> int:
        """Rows this rank holds."""
        return self.stop - self.start


def world() -> World:
    """Rank and size of the process group, or ``World(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return world().is_main


def launched() -> bool:
    """True when torchrun (or another launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(job):
    """Join the process group that torchrun's environment describes; return ``job`` for this rank.

    Outside torchrun (or with one process) nothing happens. A CUDA job runs on ``cuda:LOCAL_RANK``
    whatever index ``--device`` named; the group uses NCCL there and gloo on the CPU. Idempotent:
    a process that already set up its group (e.g. a test) keeps it.

    Raises:
        ValueError: more processes on this node than GPUs.
    """

    if not (launched() or (dist.is_available() and dist.is_initialized())):
        return job
    device = resolve_device(job.device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"--nproc/--nproc-per-node: local rank {local_rank} has no GPU "
                f"(this node has {torch.cuda.device_count()}); start at most that many processes per node"
            )
        torch.cuda.set_device(local_rank)
        job = replace(job, device=f"cuda:{local_rank}")
    if not dist.is_initialized():
        global _main_wait_group
        backend = "nccl" if device.type == "cuda" else "gloo"
        device_id = torch.device("cuda", local_rank) if backend == "nccl" else None
        dist.init_process_group(backend=backend, timeout=_minutes(STEP_TIMEOUT_ENV, DEFAULT_STEP_TIMEOUT_MIN),
                                device_id=device_id)
        _main_wait_group = dist.new_group(backend="gloo", timeout=_minutes(TIMEOUT_ENV, DEFAULT_TIMEOUT_MIN))
        atexit.register(leave)
        logger.info("rank %d of %d joined the %s process group", dist.get_rank(), dist.get_world_size(), backend)
    return job


def _minutes(env: str, default: float) -> datetime.timedelta:
    """A timeout in minutes from ``env``, else ``default``."""
    return datetime.timedelta(minutes=float(os.environ.get(env, default)))


def leave() -> None:
    """Tear down the process group, if one is up."""
    global _main_wait_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _main_wait_group = None


def _device() -> torch.device:
    """Where collective buffers live: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------- sample split
def split_samples(total: int) -> Shard:
    """This rank's share of ``total`` calibration samples: rows ``[total*r // W, total*(r+1) // W)``.

    Raises:
        ValueError: fewer samples than processes.
    """
    here = world()
    if total < here.size:
        raise ValueError(f"--n-samples {total} is fewer than the {here.size} processes: give each at least one sample")
    bounds = tuple((total * r // here.size, total * (r + 1) // here.size) for r in range(here.size))
    return Shard(*bounds[here.rank], total, bounds)


def local_shard(rows: int) -> Shard:
    """Where this rank's ``rows`` lie on the global sample axis, ranks holding consecutive rows in rank order."""
    here = world()
    if here.size == 1:
        return Shard(0, rows, rows, ((0, rows),))
    sizes = [None] * here.size
    dist.all_gather_object(sizes, int(rows))
    starts = [sum(sizes[:r]) for r in range(here.size)]
    bounds = tuple((start, start + size) for start, size in zip(starts, sizes))
    return Shard(*bounds[here.rank], sum(sizes), bounds)


# --------------------------------------------------------------------------- reductions
def all_reduce_sum(*numbers: float) -> tuple[float, ...]:
    """Python numbers summed over ranks (in float64); returned unchanged in a single process."""
    if world().size == 1:
        return numbers
    values = torch.tensor(numbers, dtype=torch.float64, device=_device())
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return tuple(values.tolist())


def all_reduce_sum_(tensors: Iterable[Tensor]) -> None:
    """Sum each tensor over ranks, in place."""
    if world().size == 1:
        return
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def all_reduce_statistics(stats: Iterable) -> None:
    """Sum every live tensor of each ``LayerStats.state()`` (sums and ``n_tokens``) over ranks, in place.

    Afterwards every rank's statistics describe the tokens of all ranks, so each picks the mask a
    single process would. ``None`` entries (pruners without statistics) are skipped.
    """
    if world().size == 1:
        return
    for layer_stats in stats:
        if layer_stats is not None:
            all_reduce_sum_(layer_stats.state().values())


def all_reduce_grads_(params: Iterable[Tensor]) -> None:
    """Sum each parameter's ``.grad`` over ranks, in place, with one flat all_reduce per dtype and device.

    Each rank's loss must already be divided by the size of the *global* batch; the sum is then the
    gradient of the global batch mean. A gradient missing on every rank stays ``None`` (the optimizer
    skips it, as in one process); missing on some ranks only, it counts as zeros there.
    """
    if world().size == 1:
        return
    groups: dict[tuple, list[Tensor]] = {}
    for param in params:
        groups.setdefault((param.dtype, param.device), []).append(param)
    for (dtype, device), group in groups.items():
        present = torch.tensor([p.grad is not None for p in group], dtype=dtype, device=device)  # (k,)
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group]
        flat = torch.cat([present, *grads])  # (k + sum of sizes,)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = len(group)
        for param, seen in zip(group, flat[: len(group)].tolist()):
            summed = flat[offset : offset + param.numel()].view_as(param)
            offset += param.numel()
            if not seen:
                param.grad = None
            elif param.grad is None:
                param.grad = summed.clone()
            else:
                param.grad.copy_(summed)


def broadcast_from_main_(tensors: Iterable[Tensor]) -> None:
    """Overwrite each tensor with rank 0's values, in place (keeps ranks bit-identical)."""
    if world().size == 1:
        return
    for tensor in tensors:
        dist.broadcast(tensor.data, src=0)


# --------------------------------------------------------------------------- rank 0 decides
def from_main(compute: Callable[[], T] | None) -> T:
    """Run ``compute`` on rank 0 alone and return its result on every rank (pickled to the others).

    An exception on rank 0 is raised there and, as ``ValueError`` with the same message when it is
    one (else ``RuntimeError``), on every other rank, so no rank waits forever. Other ranks may pass
    None. In a single process this is ``compute()``.
    """
    here = world()
    if here.size == 1:
        return compute()
    message: list = [None]
    if here.is_main:
        try:
            result = compute()
        except Exception as error:
            message[0] = ("error", isinstance(error, ValueError), str(error) or type(error).__name__)
            dist.broadcast_object_list(message, src=0, group=_main_wait_group)
            raise
        message[0] = ("ok", result)
        dist.broadcast_object_list(message, src=0, group=_main_wait_group)
        return result
    dist.broadcast_object_list(message, src=0, group=_main_wait_group)
    if message[0][0] == "error":
        _, user_error, text = message[0]
        raise (ValueError(text) if user_error else RuntimeError(f"rank 0 failed: {text}"))
    return message[0][1]


def agree(compute: Callable[[], T], main_first: bool = False) -> T:
    """Run ``compute`` on every rank; an exception on any rank is raised on all of them.

    Use it around work whose outcome may differ between ranks (free memory, loading files): otherwise
    a rank that fails leaves the others waiting in their next collective until the group's timeout.
    The failing rank raises its own exception; the others raise ``ValueError`` with its message when
    it was one (a user error: exit code 2), else ``RuntimeError`` naming the rank, the exception
    type and its message. With ``main_first`` rank 0 runs first and the others wait for it (it fills
    caches they then read, e.g. a converted GGUF); if it fails, they do not run ``compute``.
    """
    here = world()
    if here.size == 1:
        return compute()
    result, error = None, None

    def attempt():
        nonlocal result, error
        try:
            result = compute()
        except Exception as caught:  # every kind: a rank that fails silently would hang the others
            error = caught

    if main_first and here.is_main:
        attempt()
    if main_first:
        failed = [_failure(error)]
        dist.broadcast_object_list(failed, src=0, group=_main_wait_group)  # a barrier that carries rank 0's failure
        if failed[0] is not None:  # every rank stops here: the others skip compute
            raise error if here.is_main else _raised_elsewhere(0, failed[0])
    if not (main_first and here.is_main):
        attempt()
    failures: list = [None] * here.size
    dist.all_gather_object(failures, _failure(error))
    if error is not None:
        raise error
    failed = next(((rank, failure) for rank, failure in enumerate(failures) if failure is not None), None)
    if failed is not None:
        raise _raised_elsewhere(*failed)
    return result


def _failure(error: BaseException | None) -> tuple[bool, str] | None:
    """What other ranks need to know of an exception: (is it a user error, its one-line text)."""
    if error is None:
        return None
    if isinstance(error, ValueError):
        return True, str(error)
    return False, f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _raised_elsewhere(rank: int, failure: tuple[bool, str]) -> Exception:
    """The exception a rank raises for another rank's ``failure``."""
    user_error, text = failure
    return ValueError(f"rank {rank}: {text}") if user_error else RuntimeError(f"rank {rank} failed: {text}")


# --------------------------------------------------------------------------- activation rows
def _chunks(start: int, stop: int, row_bytes: int):
    step = max(1, TRANSFER_CHUNK_BYTES // max(row_bytes, 1))
    for first in range(start, stop, step):
        yield first, min(first + step, stop)


def gather_rows(local: Tensor) -> Tensor | None:
    """Concatenate every rank's rows (in rank order) on rank 0, as a CPU tensor; None on other ranks.

    ``local`` is ``(rows, ...)``; ranks may hold different numbers of rows. Rows travel in chunks of
    at most ``TRANSFER_CHUNK_BYTES``, so only one chunk at a time sits in the collective buffer.
    """
    here = world()
    if here.size == 1:
        return local.to("cpu")
    shard = local_shard(local.shape[0])
    device = _device()
    row_shape, row_bytes = tuple(local.shape[1:]), local[:1].numel() * local.element_size()
    if here.is_main:
        full = torch.empty((shard.total, *row_shape), dtype=local.dtype)
        full[shard.start : shard.stop] = local.to("cpu")
        for rank in range(1, here.size):
            start, stop = shard.bounds[rank]
            for first, last in _chunks(start, stop, row_bytes):
                buffer = torch.empty((last - first, *row_shape), dtype=local.dtype, device=device)
                dist.recv(buffer, src=rank)
                full[first:last] = buffer.to("cpu")
        return full
    for first, last in _chunks(0, local.shape[0], row_bytes):
        dist.send(local[first:last].to(device).contiguous(), dst=0)
    return None


def scatter_rows(full: Tensor | None, shard: Shard, row_shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """The rows of ``shard`` from rank 0's ``full`` (``(shard.total, *row_shape)``), as a CPU tensor.

    The inverse of :func:`gather_rows`; other ranks pass ``full=None``. In a single process this is
    ``full`` itself.
    """
    here = world()
    if here.size == 1:
        return full
    device = _device()
    row_bytes = int(torch.Size(row_shape).numel()) * torch.empty((), dtype=dtype).element_size()
    if here.is_main:
        for rank in range(1, here.size):
            start, stop = shard.bounds[rank]
            for first, last in _chunks(start, stop, row_bytes):
                dist.send(full[first:last].to(device, dtype).contiguous(), dst=rank)
        return full[shard.start : shard.stop].to(dtype)
    local = torch.empty((shard.size, *row_shape), dtype=dtype)
    for first, last in _chunks(0, shard.size, row_bytes):
        buffer = torch.empty((last - first, *row_shape), dtype=dtype, device=device)
        dist.recv(buffer, src=0)
        local[first:last] = buffer.to("cpu")
    return local


# --------------------------------------------------------------------------- scratch space
@contextmanager
def scratch_dir():
    """A private temporary folder, removed on exit (non-main ranks keep disk-tier streams here, never in --out)."""
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix=f"reconstruct-rank{world().rank}-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
