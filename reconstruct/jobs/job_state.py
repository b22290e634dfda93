"""A job's state in ``--out``: lock, manifest, calibration tokens, activation checkpoints.

Everything the engine writes besides block shards goes through here, so the resume rules live in
one place: the manifest is saved last after every step, checkpoints are new files (never
overwritten in place), and a changed job is refused before anything is touched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

import reconstruct
from reconstruct.parallel import distributed
from calib.activations import ActivationStream
from calib.self_generated import chunk_length, generate_self_calibration
from calib.text_sources import SELF, read_text, sample_windows, tokenize_text
from reconstruct.atomic import atomic_write_json, remove_stale_temp_files, save_safetensors_atomic, sha256_file
from reconstruct.state.checkpoint_policy import CheckpointPolicy
from reconstruct.config import JobConfig
from reconstruct.state.fingerprint import HashCache, file_stat, fingerprint_model_files, hash_text_source
from reconstruct.modelio.loaded import LoadedModel
from reconstruct.state.lock import JobLock
from reconstruct.state.sampling_checkpoint import load_sampling, partial_path, save_sampling
from reconstruct.state.manifest import WORLD_SIZE_KEY, Manifest, verify_block_files, verify_stream_checkpoint
from reconstruct.modelio.output import STATE_DIR
from reconstruct.state.out_folder import check_out_dir
from reconstruct.planner.tier import choose_stream_tier, streams_fit_free_memory
from reconstruct.progress import progress_bar
from reconstruct.state.retrain_stage_record import complete_pending_swap
from reconstruct.runtime import dtype_name
from reconstruct.modelio.folder_layout import HASH_CACHE_NAME
from reconstruct.jobs.retrain_job import data_identity

logger = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration-tokens.safetensors"
VALIDATION_FILE = "validation-tokens.safetensors"  # --recon-val-data's windows


def job_fingerprint(job: JobConfig, loaded: LoadedModel, hashes: HashCache | None = None) -> dict:
    """Everything that determines the output bytes; resume refuses a job whose fingerprint differs.

    ``hashes`` remembers the model files' whole-file digests (``fingerprint.HashCache``): without it
    every model file is read in full.
    """
    calib = job.calib
    prune = job.prune
    framing = loaded.framing(calib.bos)
    calibration = {"source": text_source_identity(calib.source), "n_samples": calib.n_samples,
                   "seq_len": calib.seq_len}
    if framing.bos_id is not None:  # only with a BOS: fingerprints of jobs framed as before stay as they were
        calibration["bos_id"] = framing.bos_id
    return {
        "model_files": fingerprint_model_files(loaded.folder, hashes),
        "model_type": loaded.config.model_type,
        "pruner": prune.pruner,
        "pattern": asdict(prune.pattern),
        "sequential": prune.sequential,
        "sparsegpt": {"blocksize": prune.blocksize, "percdamp": prune.percdamp} if prune.pruner == "sparsegpt" else None,
        # keys only jobs that use them carry, so the fingerprints of older jobs stay as they were
        **({"loraprune": {"steps": prune.loraprune_steps, "rank": prune.loraprune_rank, "lr": prune.loraprune_lr,
                          **({"objective": "model"} if prune.loraprune_objective == "model" else {})}}
           if prune.pruner == "loraprune" else {}),
        **({"cycles": {"cycles": prune.cycles, "schedule": prune.cycle_schedule}} if prune.cycles != 1 else {}),
        **({"heads_per_kv_group": True} if prune.heads_per_kv_group else {}),  # --shrink's head selection
        **({"allocation": prune.allocation.fingerprint()} if not prune.allocation.uniform else {}),  # per-block sparsity
        "method": asdict(job.recon) if job.recon is not None else None,
        "calibration": calibration,
        # only with --recon-val-data: the fingerprints of jobs that hold out calibration samples stay as they were
        **({"validation": {"source": text_source_identity(job.recon_val_data.source),
                           "n_samples": job.recon_val_data.n_samples}} if job.recon_val_data is not None else {}),
        "seed": calib.seed,
        "dtype": dtype_name(loaded.dtype),
        "device_type": loaded.device.type,
        "micro_batch": job.micro_batch,
        **({"track_error": True} if job.track_error else {}),  # only when set: older fingerprints stay valid
        **({"retrain": retrain_identity(job)} if job.retrain is not None else {}),  # the global stage, when asked
        # processes sharing the samples: another count changes the float summation order (docs/distributed.md)
        **({WORLD_SIZE_KEY: distributed.world().size} if distributed.world().size > 1 else {}),
        "versions": {"reconstruct": reconstruct.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }


def text_source_identity(source: str) -> dict:
    """What of a ``--calib``-style source decides its windows: a file's name and content hash, else its name."""
    if source != SELF and Path(source).expanduser().is_file():
        return {"file": Path(source).name, "sha256": hash_text_source(Path(source).expanduser())}
    return {"name": source}


def retrain_identity(job: JobConfig) -> dict:
    """The fingerprint of ``run``'s retraining stage: its settings and its training text."""

    return {**job.retrain.fingerprint(), "data": data_identity(job.retrain_data or job.calib.source)}


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
        check_out_dir(job.out)
        created_folder = not job.out.exists()
        job.out.mkdir(parents=True, exist_ok=True)
        started_new = False
        try:
            with JobLock(job.out):
                remove_stale_temp_files(job.out)  # left by a process killed mid-write
                remove_stale_temp_files(job.out / STATE_DIR)  # ... e.g. an activation checkpoint's
                complete_pending_swap(job.out)  # a retraining stage killed while swapping its blocks in
                hashes = HashCache(job.out / STATE_DIR / HASH_CACHE_NAME)
                manifest = cls._load_or_start(job, job_fingerprint(job, loaded, hashes), loaded.layout.n_blocks)
                hashes.save()  # after _load_or_start, which empties the state folder of a new job
                started_new = manifest.first_unfinished_block() == 0 and manifest.stream_checkpoint is None
                try:
                    yield cls(job, manifest)
                except ValueError:
                    if started_new and manifest.first_unfinished_block() == 0:
                        Manifest.path(job.out).unlink(missing_ok=True)
                        shutil.rmtree(job.out / STATE_DIR, ignore_errors=True)
                    raise
        except ValueError:
            if created_folder and started_new and not any(job.out.iterdir()):
                job.out.rmdir()
            raise

    @staticmethod
    def _load_or_start(job: JobConfig, fingerprint: dict, n_blocks: int) -> Manifest:
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
            shutil.rmtree(job.out / STATE_DIR, ignore_errors=True)
            manifest = Manifest.new(fingerprint, n_blocks)
            manifest.save(job.out)
            return manifest
        manifest.check_same_job(fingerprint, job.out)
        if verify_block_files(manifest, job.out):
            manifest.finished = False
        if manifest.finished and not _outputs_intact(manifest, job.out):
            logger.warning("%s: finished output files are missing or changed; writing them again", job.out)
            manifest.finished = False
        return manifest

    @property
    def finished(self) -> bool:
        """True when the folder already holds this job's complete output."""
        return self.manifest.finished

    def report(self) -> dict:
        """The report of a finished job, as written to ``reconstruct.json``."""
        path = self.out / "reconstruct.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def update_report(self, report: dict) -> None:
        """Rewrite a finished job's ``reconstruct.json`` (an evaluation added later) and record its new hash."""
        atomic_write_json(self.out / "reconstruct.json", report)
        if "reconstruct.json" in self.manifest.outputs:
            self.manifest.outputs["reconstruct.json"] = sha256_file(self.out / "reconstruct.json")
            self._save()

    # --------------------------------------------------------------- calibration and streams
    def calibration_tokens(self, loaded: LoadedModel) -> torch.Tensor:
        """The (n, T) calibration token ids: read back on resume, else built and saved.

        In a distributed run rank 0 reads or builds them and broadcasts them to every rank.
        """
        return distributed.from_main(lambda: self._calibration_tokens_here(loaded))

    def validation_tokens(self, loaded: LoadedModel) -> torch.Tensor:
        """The (m, T) windows of ``--recon-val-data``: read back on resume, else built and saved.

        Drawn as the calibration windows are (same length and framing), with their own seed
        (``ValidationData.seed``). In a distributed run rank 0 reads or builds them and broadcasts them.
        """
        val = self.job.recon_val_data
        windows = TokenWindows(val.source, val.n_samples, val.seed(self.job.calib.seed), "--recon-val-data")
        return distributed.from_main(lambda: self._tokens_here(loaded, VALIDATION_FILE, windows))

    def _calibration_tokens_here(self, loaded: LoadedModel) -> torch.Tensor:
        calib = self.job.calib
        windows = TokenWindows(calib.source, calib.n_samples, calib.seed, "calibration")
        return self._tokens_here(loaded, CALIBRATION_FILE, windows)

    def _tokens_here(self, loaded: LoadedModel, name: str, windows: TokenWindows) -> torch.Tensor:
        """The (n, T) token windows saved as ``name`` in the state folder, or built from ``windows`` and saved."""
        path = self.state_dir / name
        if path.is_file():
            tokens = _load_checked(path)
            if tokens is not None:
                return tokens
            logger.warning("%s is damaged; building the %s tokens again", path, windows.label)
        calib = self.job.calib
        framing = loaded.framing(calib.bos)
        logger.info("%s windows: %s", windows.label, framing.describe())
        if windows.source == SELF:
            tokens = self._sample_tokens(loaded, path, windows, framing)
        else:
            ids = tokenize_text(read_text(windows.source), loaded.tokenizer())
            try:
                tokens = sample_windows(ids, windows.n_samples, calib.seq_len, windows.seed, framing=framing)
            except ValueError as error:
                if windows.label == "calibration":
                    raise
                raise ValueError(f"{windows.label} {windows.source}: {error}") from None
        self.state_dir.mkdir(exist_ok=True)
        tokens = tokens.contiguous()
        save_safetensors_atomic(path, {"tokens": tokens}, {"tokens_sha256": _tensor_digest(tokens)})
        partial_path(path).unlink(missing_ok=True)
        return tokens

    def _sample_tokens(self, loaded: LoadedModel, path: Path, windows: TokenWindows, framing) -> torch.Tensor:
        """``--calib self`` (or ``--recon-val-data self``): sampled from the dense model, checkpointed after
        every chunk in ``<name>.partial.safetensors`` so a rerun continues where Ctrl-C stopped it."""
        seq_len = self.job.calib.seq_len
        total = windows.n_samples * (seq_len - 1)
        key = {"n_samples": windows.n_samples, "seq_len": seq_len, "seed": windows.seed, "bos": framing.bos_id,
               "chunk": chunk_length(seq_len)}
        checkpoint = partial_path(path)
        resumed = load_sampling(checkpoint, key)
        state, seconds_before = resumed if resumed is not None else (None, 0.0)
        done = state.tokens_done() if state is not None else 0
        if state is not None:
            logger.info("continuing self-%s sampling at token %d of %d", windows.label, done, total)
        else:
            logger.info("sampling %d × %d %s tokens from the dense model", windows.n_samples, seq_len, windows.label)
        started = time.monotonic()
        self.state_dir.mkdir(exist_ok=True)

        def save(progress) -> None:
            save_sampling(checkpoint, progress, key, total, seconds_before + time.monotonic() - started)
            self._save()  # the manifest's elapsed time counts the sampling too

        with progress_bar(desc=f"self-{windows.label.lstrip('-')}", unit="token", total=total, initial=done) as bar:
            return generate_self_calibration(
                loaded.folder, windows.n_samples, seq_len, windows.seed, loaded.device, loaded.dtype,
                framing=framing, on_tokens=bar.update, resume=state, on_checkpoint=save,
            )

    def stream_path(self, name: str) -> Path:
        """Working file of a disk-tier activation stream (outside ``--out`` on ranks other than 0)."""
        return (self.scratch or self.state_dir) / f"stream-{name}.bin"

    def offload_tier(self, loaded: LoadedModel, n_tokens: int) -> str:
        """The activation-cache tier: ``--offload`` unless ``auto``, else the fastest that fits.

        ``run`` resolves ``auto`` to the memory plan's tier before the state is opened, so ``auto``
        is left here only when no plan could be made; the rule is ``planner.tier``'s either way.
        """
        stream_bytes = self.job.n_streams * n_tokens * loaded.hidden_size * torch.finfo(loaded.dtype).bits // 8
        return choose_stream_tier(self.job.offload, loaded.device.type,
                                  streams_fit_free_memory(stream_bytes, loaded.device))

    def restore_streams(self, sparse: ActivationStream, dense: ActivationStream | None) -> int:
        """Load the latest intact activation checkpoint; return the first block still to compute.

        Checkpoints hold the full streams. In a distributed run rank 0 reads the file and sends every
        rank its rows, so a job may resume with a different number of processes.
        """
        shard = distributed.local_shard(sparse.n_samples)  # this rank's rows of the full streams
        tensors: dict[str, torch.Tensor] = {}

        def read_checkpoint() -> int:
            manifest = self.manifest
            if not verify_stream_checkpoint(manifest, self.out):
                return 0
            after = int(manifest.stream_checkpoint["after_block"])
            if any(record.status != "done" for record in manifest.blocks[: after + 1]):
                logger.warning("a block before the activation checkpoint must be recomputed: starting from block 1")
                return 0
            tensors.update(load_file(self.out / manifest.stream_checkpoint["file"]))
            expected = (shard.total, *sparse.shape[1:])
            for values in tensors.values():
                if tuple(values.shape) != expected:
                    raise ValueError(f"activation checkpoint has shape {tuple(values.shape)}, expected {expected}")
            return after + 1

        start = distributed.from_main(read_checkpoint)
        if start:
            for name, stream in _named_streams(sparse, dense).items():
                stream.load(distributed.scatter_rows(tensors.get(name), shard, stream.shape[1:], stream.dtype))
            logger.info("resuming at block %d of %d", start + 1, self.manifest.n_blocks)
        return start

    # --------------------------------------------------------------- progress
    def record_allocation(self, allocation: dict) -> None:
        """Save the per-block sparsities (``reconstruct.loop.allocation``) in the manifest before block 0."""
        self.manifest.set_allocation(allocation)
        self._save()

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
        for name, stream in _named_streams(sparse, dense).items():
            values = distributed.gather_rows(stream.to_cpu())  # None on ranks other than 0
            if private and values is not None and values.untyped_storage().data_ptr() == stream.data.untyped_storage().data_ptr():
                values = values.clone()  # (n, T, H): the next block overwrites the stream in place
            streams[name] = values
        return streams if distributed.is_main() else None

    def record_loraprune(self, stage: dict) -> None:
        """Save model-level LoRAPrune's result (mask files, schedule) in the manifest before block 0."""
        self.manifest.set_loraprune(stage)
        self._save()

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
        self._save()

    def _checkpoint_streams(self, index: int, streams: dict[str, torch.Tensor]) -> None:
        """Write the checkpoint file; the manifest is saved pointing at it before the previous one goes."""
        name = f"{STATE_DIR}/streams-after-{index:05d}.safetensors"
        digest = save_safetensors_atomic(self.out / name, streams)
        previous = self.manifest.stream_checkpoint
        self.manifest.set_stream_checkpoint(index, name, digest)
        self._save()  # the manifest points at the new file before the old one goes
        if previous and previous["file"] != name:
            (self.out / previous["file"]).unlink(missing_ok=True)

    def _save(self) -> None:
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
        }

    def finish(self, output_files: list[str]) -> None:
        """Mark the job finished, recording the hashes of ``output_files``; drop the checkpoints."""
        self.manifest.outputs = {name: sha256_file(self.out / name) for name in output_files}
        self.manifest.finished = True
        checkpoint = self.manifest.stream_checkpoint
        self.manifest.stream_checkpoint = None
        self._save()
        if checkpoint:
            (self.out / checkpoint["file"]).unlink(missing_ok=True)
        for name in ("sparse", "dense"):
            self.stream_path(name).unlink(missing_ok=True)


@dataclass(frozen=True)
class TokenWindows:
    """Which token windows to draw: from ``source``, ``n_samples`` of them, seeded; ``label`` names them in logs."""

    source: str  # a --calib source
    n_samples: int
    seed: int
    label: str  # "calibration", or the flag that asked for them


def _named_streams(sparse: ActivationStream, dense: ActivationStream | None) -> dict[str, ActivationStream]:
    """The streams a job carries, by their checkpoint names (no dense stream for a plain prune)."""
    return {"sparse": sparse} if dense is None else {"sparse": sparse, "dense": dense}


def _outputs_intact(manifest: Manifest, out: Path) -> bool:
    """True when every recorded non-block output file exists with its recorded hash."""
    for name, digest in manifest.outputs.items():
        path = out / name
        if not path.is_file() or sha256_file(path) != digest:
            return False
    return True


def _tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.numpy().tobytes()).hexdigest()


def _load_checked(path: Path) -> torch.Tensor | None:
    """Calibration tokens saved with their digest; None if the file is damaged."""
    try:
        with safe_open(path, framework="pt") as handle:
            expected = (handle.metadata() or {}).get("tokens_sha256")
            tokens = handle.get_tensor("tokens")
    except Exception:  # truncated or garbled file: rebuild it
        return None
    return tokens if expected == _tensor_digest(tokens) else None
