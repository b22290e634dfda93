"""``reconstruct retrain``: one model-level retraining job in its output folder, resumable.

Everything a user can get wrong is checked before anything is written: the method and its settings
(``RetrainSpec``), ``--seq-len`` against the model's context, a ``--model`` whose block linears hold no
zero (nothing looks pruned: ``--allow-dense``), ``--data`` empty or shorter than one window, an
``--out`` that holds something else, a distillation loss without ``--teacher`` (or a teacher with
another vocabulary or block count). With distillation the teacher's top-k of every window is computed
once (a streamed forward, ``retrain.teacher``) and kept in ``--out/.reconstruct/`` for a resume. Then, under the job lock, the job's fingerprint is compared with
the one in ``--out/.reconstruct/retrain-manifest.json`` (a different job is refused, naming the flags
that differ), training continues from the last checkpoint, and the folder is written; the manifest is
marked finished last.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

from reconstruct.config import BOS, CHECK_STREAM, DEVICE, DTYPE, MODEL, EvalSpec
from reconstruct.flags import REQUIRED, flag, flag_name, flag_names
from reconstruct.host_allocator import unpool_large_allocations
from reconstruct.evaluation.parity import check_streamed_forward
from reconstruct.modelio.loaded import LoadedModel, load_model
from reconstruct.modelio.output import REPORT_NAME, STATE_DIR
from reconstruct.parallel import distributed
from reconstruct.retrain.checkpoint import CHECKPOINT_NAME, auto_or_every
from reconstruct.retrain.data import retrain_windows
from reconstruct.retrain.engine import Checkpointing, RetrainResult, retrain_model
from reconstruct.retrain.memory import choose_stream
from reconstruct.retrain.memory import check_fits
from reconstruct.retrain.spec import RetrainSpec
from reconstruct.runtime import peak_gpu_mb, peak_rss_mb
from reconstruct.atomic import atomic_write_json
from reconstruct.state.fingerprint import HashCache, fingerprint_model_files, text_source_identity
from reconstruct.retrain.distill import TeacherTopK
from reconstruct.retrain.teacher import TEACHER_NAME, check_teacher, teacher_top_k
from reconstruct.state.job_diff import FILE_CONTENTS as CONTENTS, SETUP_FLAGS
from reconstruct.state.job_folder import RETRAIN_JOB, JobFolder, setup_fingerprint
from reconstruct.modelio.facts import check_calib_seq_len
from reconstruct.modelio.folder_layout import RETRAIN_MANIFEST_NAME as MANIFEST_NAME  # noqa: F401  (callers import it here)
from reconstruct.reporting.retrain_report import write_retrain_report
from reconstruct.evaluation.perplexity import perplexity

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrainJob:
    """Everything ``reconstruct retrain`` needs; the command line builds it once (flags: ``reconstruct.flags``)."""

    model: str = MODEL.field()  # the pruned model: folder, .gguf, alias or hub id
    # training text: any --calib source (a .txt/.jsonl file, a dataset name, self)
    data: str = flag(REQUIRED, "--data", "Training text: a .txt/.jsonl file, wikitext2, c4, ptb, or 'self' (sampled "
                     "from the model).")
    out: Path = flag(REQUIRED, "--out", "Output folder; also holds the resume state.")  # also holds the resume state
    # --loss kd / lm+kd: the dense model distilled from (same tokenizer and block count as --model)
    teacher: str | None = flag(None, "--teacher", "--loss kd / lm+kd: the dense model to distil from (folder, .gguf, "
                               "alias or hub id; the same tokenizer and block count as --model).")
    spec: RetrainSpec = RetrainSpec()
    device: str = DEVICE.field("auto")  # auto, cpu, cuda, cuda:N
    dtype: str = DTYPE.field("auto")  # auto, float32, bfloat16, float16
    bos: str = BOS.field("auto")  # --calib-bos: how windows start
    # accept a model whose block linears hold no zero
    allow_dense: bool = flag(False, "--allow-dense", "Retrain a --model whose block linears hold no zero (nothing "
                             "looks pruned).")
    # steps between training checkpoints, or auto (bounded cost)
    checkpoint_every: str = flag("auto", "--checkpoint-every", "Steps between training checkpoints (what a resume "
                                 "restarts from), or auto = every step while that costs at most 10% of a step's "
                                 "weight reads.")
    evaluation: EvalSpec | None = None  # perplexity before and after; not part of the job's identity
    check_stream: bool = CHECK_STREAM.field(True)  # streamed path: compare it with the model's own forward first
    task_evaluation: object | None = None  # evaluation.tasks.TaskEvalSpec: --eval-tasks before and after; not in the identity

    def __post_init__(self) -> None:
        loss = flag_name(RetrainSpec, "loss")
        if self.spec.distils and not self.teacher:
            raise ValueError(f"{loss} {self.spec.loss} needs --teacher MODEL: the dense model to distil from "
                             "(the one --model was pruned from)")
        if self.teacher and not self.spec.distils:
            raise ValueError(f"--teacher is used only by {loss} kd or lm+kd; drop it or give {loss} kd")


# --------------------------------------------------------------------------- checks
def count_block_zeros(loaded: LoadedModel) -> tuple[int, int]:
    """(zeros, weights) over the block linears' weights in the checkpoint, read one tensor at a time."""
    zeros = total = 0
    for index in range(loaded.layout.n_blocks):
        prefix = loaded.layout.block_prefix(index)
        for name in loaded.layout.linear_names:
            weight = loaded.reader.read(loaded.key_map[f"{prefix}{name}.weight"])
            zeros += int((weight == 0).sum())
            total += weight.numel()
        loaded.reader.close()
    return zeros, total


def check_looks_pruned(job: RetrainJob, loaded: LoadedModel) -> float:
    """The sparsity of the block linears; refuses a model with none unless ``--allow-dense``.

    Raises:
        ValueError: no weight of any block linear is zero and ``allow_dense`` is off.
    """
    zeros, total = count_block_zeros(loaded)
    if zeros == 0 and not job.allow_dense:
        raise ValueError(f"--model {job.model}: no weight of its block linears is zero, so nothing looks pruned; "
                         "prune it first (reconstruct run) or pass --allow-dense to retrain it as it is")
    return zeros / max(1, total)


# --------------------------------------------------------------------------- identity
def retrain_fingerprint(job: RetrainJob, loaded: LoadedModel, bos_id: int | None, hashes: HashCache,
                        teacher: LoadedModel | None = None) -> dict:
    """Everything that decides the output bytes; a resume refuses a job whose fingerprint differs.

    ``teacher`` (distillation only): its files join the fingerprint as ``teacher``, so an ``lm`` job's
    fingerprint keeps the keys it always had.
    """
    return {
        # model files, dtype, device type, versions, and the processes (recorded for one process too)
        **setup_fingerprint(loaded, hashes, one_process_recorded=True),
        "data": text_source_identity(job.data),
        "retrain": job.spec.fingerprint(),
        "bos_id": bos_id,
        **({"teacher": fingerprint_model_files(teacher.folder, hashes)} if teacher is not None else {}),
    }


# Labels of the fingerprint's fields for a resume's refusal (``JobFolder.check_same_job``), from the specs' flags.
RETRAIN_FINGERPRINT_FLAGS: dict[str, str] = {
    **SETUP_FLAGS, "data": flag_name(RetrainJob, "data"), "data.sha256": flag_name(RetrainJob, "data") + CONTENTS,
    "bos_id": BOS.name, **flag_names(RetrainSpec, "retrain."),
    "teacher": flag_name(RetrainJob, "teacher") + " (its file {rest})",
}


# --------------------------------------------------------------------------- the job
def run_retrain(job: RetrainJob) -> dict:
    """Run (or resume, or report a finished) retraining job; returns the content of ``reconstruct.json``.

    Under torchrun every rank trains on its share of each step's batch (gradients summed over ranks);
    rank 0 alone reads and writes ``--out`` (lock, manifest, checkpoints, the folder) and sends the
    others what they need. Other ranks return ``{"rank": r}``.
    """
    started = time.perf_counter()
    unpool_large_allocations()  # before the skeleton is built (host_allocator)
    job = distributed.join(job)  # under torchrun: one rank of a data-parallel job (docs/distributed.md)

    def prepare() -> tuple[LoadedModel, LoadedModel | None]:  # rank 0 first: it may convert a GGUF the others read
        loaded = load_model(job.model, job.device, job.dtype)
        check_calib_seq_len(job.spec.seq_len, loaded.config)
        check_batch_split(job.spec.batch, "--samples-per-step")
        teacher = open_teacher(job, loaded)
        if distributed.is_main():
            JobFolder(job.out, RETRAIN_JOB).refuse_foreign()
        stream = choose_stream(job.spec, loaded)
        check_fits(job.spec, loaded, stream)
        if stream and job.check_stream:  # the resident path is the model's own forward already
            check_streamed_forward(loaded, job.spec.seq_len)
        return loaded, teacher

    loaded, teacher = distributed.agree(prepare, main_first=True)  # one rank refusing stops all
    sparsity = distributed.from_main(lambda: check_looks_pruned(job, loaded))
    framing = loaded.framing(job.bos)
    tokens = distributed.from_main(lambda: retrain_windows(loaded, job.data, n_windows=job.spec.n_windows,
                                                           seq_len=job.spec.seq_len, seed=job.spec.seed,
                                                           framing=framing))
    out = Path(job.out)
    state_dir = out / STATE_DIR
    with ExitStack() as stack:
        opened = distributed.from_main(lambda: _open_out(job, loaded, framing.bos_id, stack, teacher))
        if opened["finished"] is not None:
            return opened["finished"] if distributed.is_main() else {"rank": distributed.world().rank}
        fingerprint = opened["fingerprint"]
        every = auto_or_every(job.checkpoint_every, job.spec, loaded)
        top_k = distributed.from_main(lambda: teacher_rows(job, teacher, tokens, state_dir))
        result = retrain_model(loaded, job.spec, job.data, out, framing=framing, tokens=tokens,
                               checkpointing=Checkpointing(state_dir / CHECKPOINT_NAME, every), teacher=top_k)
        if not distributed.is_main():
            return {"rank": distributed.world().rank}
        report = build_report(job, fingerprint, result, sparsity, loaded)
        report["seconds_this_session"] = time.perf_counter() - started

        write_retrain_report(out, report)
        atomic_write_json(out / REPORT_NAME, report)
        opened["record"].finish()
        (state_dir / CHECKPOINT_NAME).unlink(missing_ok=True)
        (state_dir / TEACHER_NAME).unlink(missing_ok=True)
        return report


def open_teacher(job: RetrainJob, student: LoadedModel) -> LoadedModel | None:
    """The ``--teacher`` model (skeleton on ``meta``), checked against the student; None without distillation."""
    if not job.spec.distils:
        return None
    teacher = load_model(job.teacher, job.device, job.dtype)
    check_teacher(student, teacher, job.teacher, job.spec)
    return teacher


def teacher_rows(job: RetrainJob, teacher: LoadedModel | None, tokens, state_dir: Path) -> TeacherTopK | None:
    """Rank 0: the teacher's top-k of every window, kept in ``state_dir`` for a resume (None without distillation)."""
    if teacher is None:
        return None
    return teacher_top_k(teacher, tokens, job.spec, state_dir / TEACHER_NAME)


def check_batch_split(batch: int, flag: str) -> None:
    """Refuse a batch with fewer windows than processes (each rank takes a share of every step's batch).

    Raises:
        ValueError: ``batch`` is below the number of processes.
    """
    size = distributed.world().size
    if batch < size:
        raise ValueError(f"{flag} {batch} is fewer than the {size} processes: each takes a share of every step's "
                         f"batch; give {flag} at least {size} or start fewer processes")


def _open_out(job: RetrainJob, loaded: LoadedModel, bos_id: int | None, stack: ExitStack,
              teacher: LoadedModel | None = None) -> dict:
    """Rank 0: lock ``--out`` (held until ``stack`` closes), check or start its record.

    Returns:
        ``{"fingerprint", "record", "finished": None}``, or with ``finished`` the report of a finished job.
    """
    folder = JobFolder(Path(job.out), RETRAIN_JOB)
    stack.enter_context(folder.locked())
    folder.state_dir.mkdir(parents=True, exist_ok=True)
    hashes = folder.hash_cache()
    fingerprint = retrain_fingerprint(job, loaded, bos_id, hashes, teacher)
    hashes.save()
    try:
        record = folder.read_record()
    except ValueError:
        logger.warning("%s is damaged; starting the retraining over", folder.record_path)
        record = None
    if record is None:
        return {"fingerprint": fingerprint, "record": folder.new_record(fingerprint), "finished": None}
    folder.check_same_job(record.fingerprint, fingerprint, RETRAIN_FINGERPRINT_FLAGS)
    report = folder.out / REPORT_NAME
    if record.finished and report.is_file():
        logger.info("%s already holds this finished retraining job; nothing to do", folder.out)
        return {"fingerprint": fingerprint, "record": record,
                "finished": {**json.loads(report.read_text()), "already_finished": True}}
    return {"fingerprint": fingerprint, "record": record, "finished": None}


def build_report(job: RetrainJob, fingerprint: dict, result: RetrainResult, sparsity: float,
                 loaded: LoadedModel) -> dict:
    """The content of ``reconstruct.json``: the job, the training, memory and, with ``--eval`` / ``--eval-tasks``, quality."""
    report = {
        "job": {"model": job.model, "data": job.data, **({"teacher": job.teacher} if job.teacher else {}),
                **asdict(job.spec), "fingerprint": fingerprint},
        "input_block_sparsity": sparsity,
        "retrain": asdict(result),
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": peak_gpu_mb(loaded.device),
    }
    if job.evaluation is not None:
        report["evaluation"] = evaluate_before_after(job)
    if job.task_evaluation is not None:
        report["task_evaluation"] = tasks_before_after(job)
    return report


def tasks_before_after(job: RetrainJob) -> dict:
    """``--eval-tasks`` on ``--model`` and on ``--out``: ``{**settings, "before": results, "after": results}``."""
    spec = job.task_evaluation
    before = spec.evaluate(job.model, job.device, job.dtype, job.bos)
    after = spec.evaluate(str(job.out), job.device, job.dtype, job.bos)
    return {**spec.settings(), "before": before["results"], "after": after["results"]}


def evaluate_before_after(job: RetrainJob) -> dict:
    """Perplexity of ``--model`` and of ``--out`` on ``--eval`` (same windows, same framing)."""

    spec = job.evaluation
    common = dict(seq_len=spec.seq_len, max_windows=spec.max_windows, device=job.device, dtype=job.dtype,
                  bos=job.bos)
    before = perplexity(job.model, spec.data, **common)
    after = perplexity(str(job.out), spec.data, **common)
    return {"data": spec.data, "seq_len": spec.seq_len, "windows": after["windows"],
            "perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"]}
