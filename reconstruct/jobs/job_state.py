"""A run's state in ``--out``: its job folder, manifest, activation checkpoints and report.

Everything the engine writes besides block shards goes through here, so the resume rules live in
one place: the manifest is saved last after every step, checkpoints are new files (never
overwritten in place), and a changed job is refused before anything is touched. The folder itself
(refusal of a foreign ``--out``, lock, stale temp files, hash cache, the same-job check) is the job
folder every command shares (``state.job_folder``). The token windows are built in
``calibration_tokens``, the activation streams' tier and checkpoint read back in ``activation_streams``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psutil
import torch

from calib.activations import ActivationStream
from reconstruct.atomic import atomic_write_json, save_safetensors_atomic, sha256_file
from reconstruct.config import JobConfig
from reconstruct.jobs.activation_streams import named_streams, restore_streams, stream_tier
from reconstruct.jobs.run_fingerprint import MODEL_CHECK_KEY, RUN_FINGERPRINT_FLAGS, job_fingerprint, resumed_fingerprint
from reconstruct.modelio.folder_layout import REPORT_NAME, STATE_DIR
from reconstruct.modelio.loaded import LoadedModel
from reconstruct.parallel import distributed
from reconstruct.state.checkpoint_policy import CheckpointPolicy
from reconstruct.state.fingerprint import file_stat
from reconstruct.state.job_folder import RUN_JOB, JobFolder
from reconstruct.state.manifest import Manifest, verify_block_files
from reconstruct.state.model_check_record import complete_pending_revert
from reconstruct.state.retrain_stage_record import complete_pending_swap

logger = logging.getLogger(__name__)


class JobState:
    """The resumable state of one job in its output folder."""

    def __init__(self, job: JobConfig, manifest: Manifest):
        self.job = job
        self.out = job.out
        self.manifest = manifest
        self.state_dir = self.out / STATE_DIR
        self.session_started = time.monotonic()
        self.checkpoints = CheckpointPolicy(job.checkpoint_every)
        self.scratch: Path | None = None  # ranks other than 0: a private folder for disk-tier streams

    @classmethod
    @contextmanager
    def open(cls, job: JobConfig, loaded: LoadedModel):
        """Lock ``--out``, then load and check its manifest, or start a new one (see ``_open_folder``).

        In a distributed run rank 0 alone opens the folder and sends its manifest to the other ranks,
        whose state then writes nothing into ``--out``; an error on rank 0 is raised on every rank.
        """
        with ExitStack() as stack:
            opened: list[JobState] = []

            def open_folder() -> Manifest:
                opened.append(stack.enter_context(cls._open_folder(job, loaded)))
                return opened[0].manifest

            manifest = distributed.from_main(open_folder)
            state = opened[0] if opened else cls(job, manifest)
            if not opened:
                state.scratch = Path(stack.enter_context(distributed.scratch_dir()))
            yield state

    @classmethod
    @contextmanager
    def _open_folder(cls, job: JobConfig, loaded: LoadedModel):
        """Lock ``--out``, then load and check its manifest, or start a new one.

        A new job that fails on bad input before finishing its first block leaves nothing behind,
        so the corrected command starts cleanly instead of being refused as a different job.
        """
        folder = JobFolder(job.out, RUN_JOB)
        folder.refuse_foreign()
        created_folder = not job.out.exists()
        job.out.mkdir(parents=True, exist_ok=True)
        started_new = False
        try:
            with folder.locked():  # temp files of writes a kill interrupted are gone (an activation checkpoint's...)
                complete_pending_swap(job.out)  # a retraining stage killed while swapping its blocks in
                complete_pending_revert(job.out)  # a model-level check killed while writing the unrepaired blocks back
                hashes = folder.hash_cache()
                manifest = cls._load_or_start(job, folder, job_fingerprint(job, loaded, hashes), loaded.layout.n_blocks)
                hashes.save()  # after _load_or_start, which empties the state folder of a new job
                started_new = manifest.first_unfinished_block() == 0 and manifest.stream_checkpoint is None
                try:
                    yield cls(job, manifest)
                except ValueError:
                    if started_new and manifest.first_unfinished_block() == 0:
                        Manifest.path(job.out).unlink(missing_ok=True)
                        shutil.rmtree(folder.state_dir, ignore_errors=True)
                    raise
        except ValueError:
            if created_folder and started_new and not any(job.out.iterdir()):
                job.out.rmdir()
            raise

    @staticmethod
    def _load_or_start(job: JobConfig, folder: JobFolder, fingerprint: dict, n_blocks: int) -> Manifest:
        try:
            manifest = Manifest.load(job.out)
        except ValueError:  # damaged: its message says --force starts over, so let it
            if not job.force:
                raise
            logger.warning("--force: the manifest in %s is damaged; starting over", job.out)
            manifest = None
        if manifest is not None and job.force:
            logger.warning("--force: discarding the job in %s and starting over", job.out)
            manifest = None
        if manifest is None:
            # A new job must not inherit state files (calibration tokens, checkpoints) from the
            # one --force discarded: they would be read back as this job's own.
            shutil.rmtree(folder.state_dir, ignore_errors=True)
            manifest = Manifest.new(fingerprint, n_blocks)
            manifest.save(job.out)
            return manifest
        fingerprint = resumed_fingerprint(manifest.fingerprint, fingerprint, job)
        folder.check_same_job(manifest.fingerprint, fingerprint, RUN_FINGERPRINT_FLAGS)
        if verify_block_files(manifest, job.out):
            manifest.finished = False
        if manifest.finished and not folder.intact(manifest.outputs):
            logger.warning("%s: finished output files are missing or changed; writing them again", job.out)
            manifest.finished = False
        return manifest

    @property
    def model_check_on(self) -> bool:
        """True when this job runs the model-level check (its recorded fingerprint has it: ``resumed_fingerprint``)."""
        return MODEL_CHECK_KEY in self.manifest.fingerprint

    @property
    def finished(self) -> bool:
        """True when the folder already holds this job's complete output."""
        return self.manifest.finished

    def report(self) -> dict:
        """The report of a finished job, as written to ``reconstruct.json``."""
        path = self.out / REPORT_NAME
        return json.loads(path.read_text()) if path.is_file() else {}

    def update_report(self, report: dict) -> None:
        """Rewrite a finished job's ``reconstruct.json`` (an evaluation added later) and record its new hash."""
        atomic_write_json(self.out / REPORT_NAME, report)
        if REPORT_NAME in self.manifest.outputs:
            self.manifest.outputs[REPORT_NAME] = sha256_file(self.out / REPORT_NAME)
            self.save_manifest()

    # --------------------------------------------------------------- streams
    def stream_path(self, name: str) -> Path:
        """Working file of a disk-tier activation stream (outside ``--out`` on ranks other than 0)."""
        return (self.scratch or self.state_dir) / f"stream-{name}.bin"

    def offload_tier(self, loaded: LoadedModel, n_tokens: int) -> str:
        """The activation-cache tier of this rank's ``n_tokens`` (``activation_streams.stream_tier``)."""
        return stream_tier(self.job, loaded, n_tokens)

    def restore_streams(self, sparse: ActivationStream, dense: ActivationStream | None) -> int:
        """Load the latest intact activation checkpoint; return the first block still to compute."""
        return restore_streams(self.manifest, self.out, sparse, dense)

    # --------------------------------------------------------------- progress
    def record_allocation(self, allocation: dict) -> None:
        """Save the per-block sparsities (``reconstruct.loop.allocation``) in the manifest before block 0."""
        self.manifest.set_allocation(allocation)
        self.save_manifest()

    def stream_snapshot(self, index: int, sparse: ActivationStream, dense: ActivationStream | None,
                        private: bool = False) -> dict[str, torch.Tensor] | None:
        """The streams to checkpoint after block ``index``, as CPU tensors; None when no checkpoint is due.

        Called in the block loop's thread (every rank decides alike, rank 0 gathers every rank's
        rows: collectives), before the next block changes the streams in place. Other ranks get None.

        Args:
            index: the block just computed (0-based).
            sparse: the pruned stream.
            dense: the dense stream, if the job carries one.
            private: copy a stream that the CPU tensor would otherwise share (CPU tier, one
                process), so a background write reads this block's values while the next block
                computes (``loop.overlap``). The device tier's copy to host is private already.
        """
        if index == self.manifest.n_blocks - 1 or not distributed.from_main(lambda: self.checkpoints.due(index)):
            return None
        # Full streams: rank 0 gathers every rank's rows (collective), so any number of processes can resume.
        streams = {}
        for name, stream in named_streams(sparse, dense).items():
            values = distributed.gather_rows(stream.to_cpu())  # None on ranks other than 0
            if private and values is not None and values.untyped_storage().data_ptr() == stream.data.untyped_storage().data_ptr():
                values = values.clone()  # (n, T, H): the next block overwrites the stream in place
            streams[name] = values
        return streams if distributed.is_main() else None

    def record_loraprune(self, stage: dict) -> None:
        """Save model-level LoRAPrune's result (mask files, schedule) in the manifest before block 0."""
        self.manifest.set_loraprune(stage)
        self.save_manifest()

    def block_done(self, index: int, file: str, digest: str, report: dict,
                   streams: dict[str, torch.Tensor] | None) -> None:
        """Record a written block; write the activation checkpoint ``streams`` if given; save the manifest last.

        ``streams`` comes from :meth:`stream_snapshot`. Safe to call from the background writer
        thread (``loop.overlap``): the loop makes every manifest change there, in block order.
        """
        manifest = self.manifest
        stat = file_stat(self.out / file) if distributed.is_main() else None  # lets a resume skip re-hashing it
        manifest.mark_block_done(index, file, digest, report, stat)  # before the checkpoint that follows it
        if streams is not None:
            started = self.checkpoints.started()
            self._checkpoint_streams(index, streams)
            self.checkpoints.finished(started)
            manifest.blocks[index].stats["checkpoint_seconds"] = self.checkpoints.last_seconds
            if self.checkpoints.expensive:
                logger.info("activation checkpoint after block %d took %.1fs; --checkpoint-every %s",
                            index + 1, self.checkpoints.last_seconds, self.checkpoints.describe_next())
        self.save_manifest()

    def _checkpoint_streams(self, index: int, streams: dict[str, torch.Tensor]) -> None:
        """Write the checkpoint file; the manifest is saved pointing at it before the previous one goes."""
        name = f"{STATE_DIR}/streams-after-{index:05d}.safetensors"
        digest = save_safetensors_atomic(self.out / name, streams)
        previous = self.manifest.stream_checkpoint
        self.manifest.set_stream_checkpoint(index, name, digest)
        self.save_manifest()  # the manifest points at the new file before the old one goes
        if previous and previous["file"] != name:
            (self.out / previous["file"]).unlink(missing_ok=True)

    def save_manifest(self) -> None:
        """Save the manifest (rank 0 alone), adding this session's working time to its elapsed seconds."""
        if not distributed.is_main():
            return  # other ranks keep their copy of the manifest in memory only
        now = time.monotonic()
        self.manifest.elapsed_seconds += now - self.session_started
        self.session_started = now
        self.manifest.save(self.out)

    # --------------------------------------------------------------- output
    def final_report(self, peak_rss_mb: float, peak_gpu_mb: float | None) -> dict:
        """The content of ``reconstruct.json``."""
        blocks = [record.stats for record in self.manifest.blocks]
        sparsities = [value for block in blocks for value in block.get("sparsity", {}).values()]
        return {
            "job": self.manifest.fingerprint,
            "blocks": blocks,
            "mean_linear_sparsity": sum(sparsities) / max(len(sparsities), 1),
            "elapsed_seconds": self.manifest.elapsed_seconds + time.monotonic() - self.session_started,
            "peak_rss_mb": peak_rss_mb,
            "peak_gpu_mb": peak_gpu_mb,
            "host_memory_total_mb": psutil.virtual_memory().total / 2**20,
            **({"allocation": self.manifest.allocation} if self.manifest.allocation is not None else {}),
            **({"loraprune": self.manifest.loraprune} if self.manifest.loraprune is not None else {}),
            **({"experts": experts_summary(blocks)} if any(block.get("experts") for block in blocks) else {}),
        }

    def finish(self, output_files: list[str]) -> None:
        """Mark the job finished, recording the hashes of ``output_files``; drop the checkpoints."""
        self.manifest.outputs = {name: sha256_file(self.out / name) for name in output_files}
        self.manifest.finished = True
        checkpoint = self.manifest.stream_checkpoint
        self.manifest.stream_checkpoint = None
        self.save_manifest()
        if checkpoint:
            (self.out / checkpoint["file"]).unlink(missing_ok=True)
        for name in ("sparse", "dense"):
            self.stream_path(name).unlink(missing_ok=True)


def experts_summary(blocks: list[dict]) -> dict:
    """Over every block of a mixture-of-experts model: experts, and those pruned by magnitude for want of tokens."""
    records = [block["experts"] for block in blocks if block.get("experts")]
    few = sum(len(record["few_tokens"]) for record in records)
    return {"experts": sum(record["experts"] for record in records), "min_tokens": records[0]["min_tokens"],
            "few_tokens": few, "fallback": "magnitude"}

