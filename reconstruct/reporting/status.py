"""``reconstruct status DIR``: a job's progress and settings, read from its output folder.

Reads only the manifest, the lock file and the header of an unfinished ``--calib self`` sampling;
never loads the model, never takes the lock, never writes. Safe to run while the job is running.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

from reconstruct.state.lock import LOCK_NAME, pid_alive
from reconstruct.modelio.output import STATE_DIR
from reconstruct.state.manifest import DONE, MANIFEST_NAME, BlockRecord, Manifest
from reconstruct.state.sampling_checkpoint import describe_sampling, sampling_progress
from reconstruct.reporting.retrain_status import describe_retrain_job
from reconstruct.reporting.retrain_status import stage_progress


def describe_job(out: Path) -> str:
    """A few lines of plain text about the job in ``out``.

    Shows the state (finished / in progress / not started, and whether a live process holds the
    lock), blocks done / total, elapsed working time and an estimate of the time left (mean seconds
    of the done blocks × blocks left), where a rerun would restart (after the last activation
    checkpoint; see ``--checkpoint-every``), the settings from the job's fingerprint (pruner, pattern,
    method, calibration, seed, dtype), the mean sparsity and reconstruction MSE of done blocks, and
    with ``--retrain-steps`` where the retraining stage stands. A ``reconstruct retrain`` folder gets
    its own lines (``retrain.status``).

    Args:
        out: A job's output folder (``--out`` of ``reconstruct run`` or ``reconstruct retrain``).

    Returns:
        The text, lines joined with ``"\\n"``, no trailing newline.

    Raises:
        ValueError: if ``out`` does not exist or holds no manifest, or the manifest is unreadable or damaged.
    """
    out = Path(out)
    if not out.exists():
        raise ValueError(f"{out}: no such folder (pass the --out folder of a reconstruct run)")
    if not out.is_dir():
        raise ValueError(f"{out} is a file, not a job's output folder (pass the --out folder of a reconstruct run)")
    manifest = Manifest.load(out)
    if manifest is None:

        retrain_job = describe_retrain_job(out, lock_holder(out))
        if retrain_job is not None:
            return retrain_job
        raise ValueError(f"{out} holds no reconstruct job (no {MANIFEST_NAME})")
    done = [record for record in manifest.blocks if record.status == DONE]
    sampling = sampling_progress(out / STATE_DIR)
    settings = manifest.fingerprint
    lines = [
        f"job:        {out}",
        f"state:      {_state(manifest, done, lock_holder(out), sampling is not None)}",
        f"blocks:     {len(done)} / {manifest.n_blocks} done",
        f"elapsed:    {format_duration(manifest.elapsed_seconds)} (last saved {manifest.updated or '?'})",
        f"time left:  {_time_left(manifest, done)}",
        *([f"resume:     {_resume_point(manifest, done)}"] if done and not manifest.finished else []),
        *([f"sampling:   {describe_sampling(sampling)}"] if sampling is not None and not manifest.finished else []),
        f"model:      {settings.get('model_type', '?')}",
        f"pruner:     {settings.get('pruner', '?')}, pattern {_pattern(settings.get('pattern'))}",
        *([f"allocation: {_allocation(settings['allocation'], manifest.allocation)}"]
          if settings.get("allocation") else []),
        f"method:     {_method(settings.get('method'))}",
        f"calib:      {_calibration(settings.get('calibration'))}",
        *([f"validate:   {_validation(settings['validation'])}"] if settings.get("validation") else []),
        f"seed:       {settings.get('seed', '?')}, dtype {settings.get('dtype', '?')}",
    ]
    if done:
        lines.append(f"quality:    {_quality(done)}")
    if settings.get("retrain"):  # run --retrain-steps: the stage after the loop

        lines.append(f"retrain:    {stage_progress(out, settings['retrain']['steps'], manifest.finished)}")
    return "\n".join(lines)


def interrupted_summary(out: Path) -> str:
    """One line for a job stopped by Ctrl-C: blocks done / total and where the same command resumes.

    Args:
        out: the job's output folder.
    """
    out = Path(out)
    try:
        manifest = Manifest.load(out)
    except ValueError:
        manifest = None
    sampling = sampling_progress(out / STATE_DIR)
    if manifest is None:
        return f"interrupted before any block was done; the same command starts the job again in {out}"
    done = [record for record in manifest.blocks if record.status == DONE]
    if manifest.finished:
        return f"interrupted after the job finished; {out} holds the finished job"
    if sampling is not None and not done:
        return (f"interrupted while sampling the calibration in {out}: {describe_sampling(sampling)}; "
                f"then block 1 of {manifest.n_blocks}")
    resume = _resume_point(manifest, done) if done else f"at block 1 of {manifest.n_blocks}"
    return (f"interrupted with {len(done)} of {manifest.n_blocks} blocks done in {out}; "
            f"the same command resumes it {resume}")


def lock_holder(out: Path) -> int | None:
    """Pid of the live process on this host named by ``out``'s lock file, or ``None``.

    The lock file outlives a process killed with ``kill -9``; a pid that no longer exists means
    nobody is running the job. (A reused pid can make a dead job look alive; the next
    ``reconstruct run`` judges that by the kernel lock, not by the pid.)
    """
    try:
        info = json.loads((Path(out) / LOCK_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    pid = info.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool):
        return None
    if info.get("host") not in (None, socket.gethostname()):
        return None  # another host's process: cannot be checked from here
    return pid if pid_alive(pid) else None


def format_duration(seconds: float) -> str:
    """``42`` → ``"42s"``, ``185`` → ``"3m 05s"``, ``7380`` → ``"2h 03m"``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _state(manifest: Manifest, done: list[BlockRecord], holder: int | None, sampling: bool = False) -> str:
    running = f"running: pid {holder} holds the lock" if holder is not None else None
    if manifest.finished:
        return "finished" + (f" ({running})" if running else "")
    if running:
        return f"in progress ({running})"
    if not done and sampling:
        return "in progress, interrupted while sampling the calibration (rerun the same command to continue)"
    if not done:
        return "not started (no process holds the lock; rerun the same command to start)"
    return "in progress, interrupted (no process holds the lock; rerun the same command to resume)"


def _time_left(manifest: Manifest, done: list[BlockRecord]) -> str:
    if manifest.finished:
        return "none (finished)"
    remaining = manifest.n_blocks - len(done)
    timed = [float(r.stats["seconds"]) for r in done if isinstance(r.stats.get("seconds"), (int, float))]
    if not timed:
        return f"unknown until a block finishes ({_blocks(remaining)} to go)"
    mean = sum(timed) / len(timed)
    return f"about {format_duration(mean * remaining)} ({_blocks(remaining)} × {mean:.1f}s mean per block)"


def _resume_point(manifest: Manifest, done: list[BlockRecord]) -> str:
    """Where a rerun restarts: after the last activation checkpoint; later written blocks are recomputed."""
    checkpoint = manifest.stream_checkpoint
    start = int(checkpoint["after_block"]) + 1 if checkpoint else 0  # 0-based first block to compute
    where = f"at block {start + 1} of {manifest.n_blocks}"
    why = f"streams checkpointed after block {start}" if checkpoint else "no activation checkpoint yet"
    redo = sum(1 for record in done if record.index >= start)
    again = f"; {redo} written {'block' if redo == 1 else 'blocks'} computed again" if redo else ""
    return f"{where} ({why}{again})"


def _blocks(count: int) -> str:
    return f"{count} block" if count == 1 else f"{count} blocks"


def _pattern(pattern) -> str:
    if not isinstance(pattern, dict):
        return "?"
    if pattern.get("kind") == "nm":
        return f"{pattern.get('n')}:{pattern.get('m')}"
    sparsity = pattern.get("sparsity")
    share = f"{sparsity:.0%}" if isinstance(sparsity, (int, float)) else "?"
    if pattern.get("kind") in ("heads", "channels"):
        return f"{pattern['kind']} {share} removed per block"
    return f"unstructured {share} per {pattern.get('scope', 'row')}"


def _allocation(settings: dict, allocation: dict | None) -> str:
    """``owl (M 5, λ 0.08): 0.676 0.604 0.520 (weighted mean 0.6000)``, or that the pre-pass is still to run."""
    kind = settings.get("kind", "?")
    label = f"owl (M {settings.get('owl_m')}, λ {settings.get('owl_lambda')})" if kind == "owl" else kind
    if allocation is None:
        return f"{label}: not computed yet (the pre-pass runs before block 1)"
    if kind == "file":
        label = f"file {allocation.get('file', '?')}"
    sparsities = " ".join(f"{value:.3f}" for value in allocation.get("sparsities", []))
    return f"{label}: {sparsities} (weighted mean {allocation.get('mean_sparsity', 0.0):.4f})"


def _method(method) -> str:
    if not isinstance(method, dict):
        return "none"
    name = method.get("method", "?")
    if name == "none":
        return "none"
    details = [f"{method.get('steps', '?')} steps", f"lr {method.get('lr', '?')}"]
    if "lora" in name:
        details.append(f"rank {method.get('rank', '?')}")
    return f"{name} ({', '.join(details)})"


def _calibration(calibration) -> str:
    if not isinstance(calibration, dict):
        return "?"
    source = calibration.get("source") or {}
    name = source.get("file") or source.get("name") or "?"
    bos = calibration.get("bos_id")
    framing = "" if bos is None else f", BOS id {bos} first"
    return f"{name}, {calibration.get('n_samples', '?')} × {calibration.get('seq_len', '?')} tokens{framing}"


def _validation(validation: dict) -> str:
    """``--recon-val-data``'s text and window count, from the fingerprint's ``validation``."""
    source = validation.get("source") or {}
    return (f"{source.get('file') or source.get('name') or '?'}, {validation.get('n_samples', '?')} windows "
            "(--recon-val-data)")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _quality(done: list[BlockRecord]) -> str:
    sparsity = _mean([float(v) for r in done for v in (r.stats.get("sparsity") or {}).values()])
    before = _mean([float(r.stats["mse_before"]) for r in done if r.stats.get("mse_before") is not None])
    after = _mean([float(r.stats["mse_after"]) for r in done if r.stats.get("mse_after") is not None])
    parts = [f"mean sparsity {sparsity:.4f}" if sparsity is not None else "mean sparsity ?"]
    if before is not None and after is not None:
        parts.append(f"mean mse {before:.3g} → {after:.3g} (before → after reconstruction)")
    return ", ".join(parts)
