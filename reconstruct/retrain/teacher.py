"""The dense teacher of distillation: its top-k next-token distributions, computed once per job.

    teacher = teacher_top_k(dense, tokens, spec, state_dir / TEACHER_NAME)

Before training, one streamed forward of the teacher (``evaluation.streaming.StreamedLM``: one block
in memory at a time, every window through block 0, then block 1, ..., then the model's own head)
gives the logits of every window, micro-batch by micro-batch; each is reduced at once to its top-k
(``distill.top_k_log_probs``), so no (n, T, V) tensor is ever held. The result is saved in the job's
state folder (safetensors, atomically) with what it was computed from, so a resume reuses it.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from reconstruct.atomic import save_safetensors_atomic
from reconstruct.evaluation.streaming import StreamedLM
from reconstruct.modelio.folder_layout import RETRAIN_TEACHER_NAME as TEACHER_NAME  # noqa: F401  (callers import it here)
from reconstruct.modelio.loaded import LoadedModel
from reconstruct.retrain.distill import TeacherTopK, top_k_log_probs
from reconstruct.retrain.spec import RetrainSpec

logger = logging.getLogger(__name__)


def vocabulary_size(loaded: LoadedModel) -> int:
    """The width of the model's logits (its output embedding's rows, from the skeleton's shape)."""
    return int(loaded.model.get_output_embeddings().weight.shape[0])


def check_teacher(student: LoadedModel, teacher: LoadedModel, teacher_name: str, spec: RetrainSpec) -> None:
    """Refuse a teacher the student cannot be distilled from, and a top-k wider than the vocabulary.

    Raises:
        ValueError: another tokenizer vocabulary size or logits width, another block count, or
            ``--kd-top-k`` above the vocabulary size (each naming the flag).
    """
    facts = (("tokenizer vocabulary size", len(student.tokenizer()), len(teacher.tokenizer())),
             ("logits width", vocabulary_size(student), vocabulary_size(teacher)),
             ("block count", student.layout.n_blocks, teacher.layout.n_blocks))
    for what, mine, theirs in facts:
        if mine != theirs:
            raise ValueError(f"--teacher {teacher_name}: its {what} is {theirs}, the pruned --model's is {mine}; "
                             "give the dense model the pruned one was made from")
    check_top_k(spec, student)


def check_top_k(spec: RetrainSpec, loaded: LoadedModel, flag: str = "--kd-top-k") -> None:
    """Refuse a top-k above the vocabulary size (``flag``: the name the command knows it by)."""
    size = vocabulary_size(loaded)
    if spec.distils and spec.kd_top_k > size:
        raise ValueError(f"{flag} {spec.kd_top_k} exceeds the model's vocabulary of {size} tokens; give at most {size}")


def compute_teacher_top_k(teacher: LoadedModel, tokens: torch.Tensor, temperature: float, k: int,
                          micro_batch: int) -> TeacherTopK:
    """The teacher's top-k log-probabilities at ``temperature`` of every (n, T) window, by a streamed forward."""
    n, seq_len = tokens.shape
    ids = torch.empty((n, seq_len - 1, k), dtype=torch.int32)  # (n, T-1, k)
    log_probs = torch.empty((n, seq_len - 1, k), dtype=torch.float32)  # (n, T-1, k)
    lm = StreamedLM.from_loaded(teacher)
    for _, rows, logits in lm.logits([tokens], micro_batch, desc="teacher"):  # logits (b, T, V)
        top = top_k_log_probs(logits, temperature, k)
        ids[rows] = top.ids.cpu()
        log_probs[rows] = top.log_probs.cpu()
    return TeacherTopK(ids, log_probs)


def _identity(tokens: torch.Tensor, spec: RetrainSpec) -> dict[str, str]:
    """What the stored top-k was computed from: the windows' digest, the temperature and k."""
    digest = hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    return {"format": "pt", "tokens_sha256": digest, "shape": "x".join(map(str, tokens.shape)),
            "temperature": repr(float(spec.kd_temperature)), "top_k": str(spec.kd_top_k)}


def _read(path: Path, identity: dict[str, str]) -> TeacherTopK | None:
    """The stored top-k when ``path`` holds one computed from ``identity``, else None."""
    if not path.is_file():
        return None
    with safe_open(path, framework="pt") as handle:
        if handle.metadata() != identity:
            logger.warning("%s was computed from other windows or settings; computing the teacher again", path)
            return None
        return TeacherTopK(handle.get_tensor("ids"), handle.get_tensor("log_probs"))


def teacher_top_k(teacher: LoadedModel, tokens: torch.Tensor, spec: RetrainSpec, path: Path | None) -> TeacherTopK:
    """The teacher's top-k of every window: read from ``path`` when saved there before, else computed and saved.

    Args:
        teacher: the dense model (``load_model``).
        tokens: (n, T) every window of the job (training and held out).
        spec: the job (temperature, k, micro-batch).
        path: where the job keeps it (None: compute, keep nothing).
    """
    identity = _identity(tokens, spec)
    saved = _read(path, identity) if path is not None else None
    if saved is not None:
        logger.info("distillation: the teacher's top-%d read back from %s", spec.kd_top_k, path)
        return saved
    logger.info("distillation: the teacher's top-%d next-token probabilities of %d windows (streamed forward)",
                spec.kd_top_k, tokens.shape[0])
    computed = compute_teacher_top_k(teacher, tokens, spec.kd_temperature, spec.kd_top_k, spec.micro_batch)
    if path is not None:
        save_safetensors_atomic(path, {"ids": computed.ids, "log_probs": computed.log_probs}, identity)
    return computed
