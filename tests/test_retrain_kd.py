"""Distillation for model-level retraining (``--loss kd|lm+kd``, ``run --retrain-loss``).

The truncated KL of ``retrain/distill.py``, the teacher's streamed top-k (``retrain/teacher.py``),
the two training paths, the command lines, resume, and the fingerprints of ``lm`` jobs.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import BLOCK_LISTS
from reconstruct.evaluation.streaming import StreamedLM
from reconstruct.jobs.retrain_job import RETRAIN_FINGERPRINT_FLAGS, RetrainJob, retrain_fingerprint
from reconstruct.jobs.run_fingerprint import RUN_FINGERPRINT_FLAGS, retrain_identity
from reconstruct.modelio.loaded import load_model
from reconstruct.modelio.output import REPORT_NAME, STATE_DIR
from reconstruct.retrain import NoHooks, RetrainSpec
from reconstruct.retrain.distill import TeacherTopK, top_k_log_probs, truncated_kl_sum
from reconstruct.retrain.loss import Objective, scored_tokens
from reconstruct.retrain.resident import ResidentModel
from reconstruct.retrain.session import BlockLoader
from reconstruct.retrain.streamed import StreamedModel
from reconstruct.retrain.teacher import TEACHER_NAME, compute_teacher_top_k
from reconstruct.retrain.trainables import ModelTrainables
from reconstruct.state.fingerprint import HashCache
from test_retrain import SEQ_LEN, windows
from test_retrain_cli import invoke, model_files, one_error_line, run_job_cli
from tolerances import assert_within, gamma

VOCAB = 512  # conftest.VOCAB_SIZE
U32 = torch.finfo(torch.float32).eps / 2  # float32 unit roundoff
LM_RETRAIN_KEYS = {"method", "steps", "batch", "micro_batch", "seq_len", "lr", "warmup", "weight_decay", "rank",
                   "alpha", "seed", "n_windows", "val_fraction", "eval_every", "allow_dense_merge"}  # before --loss


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def kd_spec(**changes) -> RetrainSpec:
    fields = dict(method="bias-ln", loss="kd", kd_top_k=64, steps=2, batch=4, micro_batch=2, seq_len=SEQ_LEN,
                  n_windows=8, lr=1e-2, val_fraction=0.0, warmup=0.0)
    fields.update(changes)
    return RetrainSpec(**fields)


def open_model(folder: Path, spec: RetrainSpec, stream: bool, dtype: torch.dtype = torch.float32):
    """A streamed or resident model of ``folder`` with ``spec``'s trainables and objective; (model, trainables)."""
    loaded = load_model(str(folder), "cpu", "float32")
    loaded.dtype = dtype
    trainables = ModelTrainables(spec, loaded.layout)
    loader = BlockLoader(loaded, trainables, NoHooks())
    objective = Objective.of(spec)
    if stream:
        return StreamedModel(loader, spec.micro_batch, "cpu", Path("."), objective), trainables
    return ResidentModel(loader, spec.micro_batch, objective), trainables


# --------------------------------------------------------------------------- the truncated KL
@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_student_identical_to_its_teacher_has_zero_kl(tiny_model_dir, stream, temperature):
    """The dense model distilled from itself: every token's KL is 0 to log-softmax rounding.

    Bound: the student's logits come from the same kernels on the same weights in the same order as
    the teacher's (the same-order rule of ``tolerances``), so only the two float32 log-softmaxes
    differ. Each computes ``z_j/T - m - log sum exp(z_i/T - m)``: the subtraction errs by u |z_j/T - m|,
    the sum of V exponentials in (0, 1] by gamma_V of it, its log by that plus u log V. So
    |log p_j - log q_j| <= 2 (u (R + log V) + gamma_V) per token (R: the range of z/T), and the KL, a
    p-weighted mean of those (p summing to at most 1), times T^2, stays below T^2 times that.
    """
    folder = tiny_model_dir("llama")
    spec = kd_spec(kd_temperature=temperature)
    tokens = windows(4, seed=3)
    teacher = compute_teacher_top_k(load_model(str(folder), "cpu", "float32"), tokens, temperature, spec.kd_top_k, 2)
    model, _ = open_model(folder, spec, stream)
    kl_mean = model.loss(tokens, teacher)
    model.close()
    logits_range = 2 * 50.0 / temperature  # |z| of the tiny model stays far below 50 (checked next)
    per_token = temperature**2 * 2 * (U32 * (logits_range + math.log(VOCAB)) + gamma(VOCAB))
    assert abs(kl_mean) <= per_token
    lm = load_model(str(folder), "cpu", "float32")
    for _, _, logits in StreamedLM.from_loaded(lm).logits([tokens], 2):
        assert float(logits.abs().max()) < 50.0


def test_top_k_of_the_whole_vocabulary_is_the_full_kl():
    """k = V: the truncated KL is torch's ``kl_div`` summed, the same terms in another order.

    Bound: both evaluate the same float32 terms p_j (log p_j - log q_j) elementwise (exp, subtract,
    multiply: identical roundings) and sum the N of them in different orders, so the two sums differ
    by at most 2 gamma_N sum |terms| (Higham 3.5, once per side), times T^2.
    """
    generator = torch.Generator().manual_seed(0)
    for temperature in (1.0, 0.5, 3.0):
        teacher_logits = 3 * torch.randn(2, SEQ_LEN, VOCAB, generator=generator)  # (b, T, V)
        student_logits = 3 * torch.randn(2, SEQ_LEN, VOCAB, generator=generator)  # (b, T, V)
        teacher = top_k_log_probs(teacher_logits, temperature, VOCAB)
        truncated = truncated_kl_sum(student_logits, teacher, temperature)
        log_p = F.log_softmax(teacher_logits[:, :-1] / temperature, dim=-1)  # (b, T-1, V)
        log_q = F.log_softmax(student_logits[:, :-1] / temperature, dim=-1)
        full = temperature**2 * F.kl_div(log_q, log_p, log_target=True, reduction="sum")
        terms = (log_p.double().exp() * (log_p.double() - log_q.double())).abs().sum()
        assert_within(truncated, full, temperature**2 * 2 * gamma(log_p.numel()) * terms)
        assert TeacherTopK(teacher.ids, teacher.log_probs).truncation_error()["max"] <= gamma(VOCAB)


def test_the_truncation_error_is_the_mass_outside_the_top_k():
    logits = torch.randn(1, 3, VOCAB, generator=torch.Generator().manual_seed(1))  # (1, T, V)
    top = top_k_log_probs(logits, 1.0, 8)
    probs = F.softmax(logits[:, :-1].double(), dim=-1)  # (1, T-1, V)
    outside = 1 - probs.topk(8, dim=-1).values.sum(-1)  # (1, T-1)
    error = top.truncation_error()
    bound = 8 * gamma(VOCAB)  # float32 log-softmax rounding of 8 probabilities, each < 1
    assert abs(error["mean"] - float(outside.mean())) <= bound
    assert abs(error["max"] - float(outside.max())) <= bound
    assert top.ids.dtype == torch.int32 and top.log_probs.dtype == torch.float32


# --------------------------------------------------------------------------- streamed = resident
@pytest.mark.parametrize("loss", ["kd", "lm+kd"])
def test_streamed_and_resident_kd_losses_and_gradients_agree(tiny_model_dir, loss):
    """float64 forwards on both paths, the same windows, trainables and teacher rows.

    Bound (as ``test_retrain``'s gradient oracle): each gradient entry is built from sums of at most
    K products along the path (the block widths, the sequence, the vocabulary, over the depth), each
    within gamma_K (float64) of the sum of absolute terms, which the entry's largest value bounds to
    first order; the trainables are float32, so each micro-batch's gradient is rounded to float32
    and accumulated there (gamma_(W+3), float32, W the widest weight dimension). The losses are
    float64 sums of the same K-term quantities.
    """
    folder = tiny_model_dir("llama")
    tokens = windows(4, seed=1)
    teacher = compute_teacher_top_k(load_model(str(folder), "cpu", "float32"), tokens, 1.5, 32, 2)
    spec = kd_spec(loss=loss, kd_temperature=1.5, kd_top_k=32)
    generator = torch.Generator().manual_seed(5)
    state, grads, losses, config, widest = None, {}, {}, None, 0
    for stream in (True, False):
        model, trainables = open_model(folder, spec, stream, torch.float64)
        model.loss(tokens[:1], teacher.rows(slice(0, 1)))  # every block attached: the trainables exist
        if state is None:
            state = {key: value + 0.05 * torch.randn(value.shape, generator=generator, dtype=value.dtype)
                     for key, value in trainables.state().items()}  # away from the teacher: a nonzero KL
        trainables.load_state(state)
        losses[stream] = model.loss_and_gradients(tokens, None, teacher) / scored_tokens(tokens)
        grads[stream] = [param.grad.clone() for param in trainables.parameters()]
        config = model.loaded.config
        widest = max(max(param.shape) for param in model.loaded.blocks.parameters())
        model.close()
    terms = config.num_hidden_layers * (4 * config.hidden_size + 4 * 128 + SEQ_LEN) + config.vocab_size
    assert losses[True] > 0
    assert abs(losses[True] - losses[False]) <= gamma(terms, torch.float64) * abs(losses[False])
    for streamed, resident in zip(grads[True], grads[False]):
        scale = resident.abs().max().double()
        assert scale > 0
        assert_within(streamed, resident, gamma(terms, torch.float64) * scale + gamma(widest + 3) * scale)


# --------------------------------------------------------------------------- fingerprints
def test_lm_fingerprints_keep_their_keys_and_distillation_adds_its_own(tiny_model_dir):
    """A default (``lm``) job's fingerprint has exactly the keys it had before ``--loss``: old jobs resume."""
    lm, kd = RetrainSpec(), RetrainSpec(loss="kd")
    assert set(lm.fingerprint()) == LM_RETRAIN_KEYS
    assert set(kd.fingerprint()) == LM_RETRAIN_KEYS | {"loss", "kd_temperature", "kd_top_k"}
    run_job = SimpleNamespace(retrain=lm, retrain_data=None, calib=SimpleNamespace(source="self"))
    assert set(retrain_identity(run_job)) == LM_RETRAIN_KEYS | {"data"}
    folder = tiny_model_dir("llama")
    loaded = load_model(str(folder), "cpu", "float32")
    job = RetrainJob(model=str(folder), data="self", out=Path("unused"))
    plain = retrain_fingerprint(job, loaded, None, HashCache())
    assert set(plain) == {"model_files", "dtype", "device_type", "world_size", "versions", "data", "retrain", "bos_id"}
    distilling = RetrainJob(model=str(folder), data="self", out=Path("unused"), spec=kd, teacher=str(folder))
    with_teacher = retrain_fingerprint(distilling, loaded, None, HashCache(), teacher=loaded)
    assert set(with_teacher) == set(plain) | {"teacher"}
    assert with_teacher["teacher"] == plain["model_files"]
    assert RETRAIN_FINGERPRINT_FLAGS["retrain.loss"] == "--loss"
    assert RUN_FINGERPRINT_FLAGS["retrain.loss"] == "--retrain-loss"
    assert RUN_FINGERPRINT_FLAGS["retrain.kd_top_k"] == "--retrain-kd-top-k"


# --------------------------------------------------------------------------- command lines
FLAGS = ["--device", "cpu", "--seq-len", "16", "--n-samples", "8", "--samples-per-step", "4", "--batch-size", "2",
         "--steps", "2", "--method", "bias-ln", "--lr", "1e-2", "--val", "0.25", "--eval-every", "1"]


def test_retrain_kd_without_a_teacher_is_one_line_and_exit_2(pruned_llama, small_calib_file, tmp_path):
    out = tmp_path / "out"
    line = one_error_line(invoke("--model", str(pruned_llama), "--data", str(small_calib_file), "--out", str(out),
                                 *FLAGS, "--loss", "kd"))
    assert "--loss kd needs --teacher" in line
    assert not out.exists()
    line = one_error_line(invoke("--model", str(pruned_llama), "--data", str(small_calib_file), "--out", str(out),
                                 *FLAGS, "--teacher", str(pruned_llama)))
    assert "--teacher is used only by --loss kd" in line
    line = one_error_line(invoke("--model", str(pruned_llama), "--data", str(small_calib_file), "--out", str(out),
                                 *FLAGS, "--loss", "kd", "--teacher", str(pruned_llama), "--kd-top-k", "513"))
    assert "--kd-top-k 513 exceeds" in line
    assert not out.exists()



def test_a_teacher_with_another_block_count_is_refused(pruned_llama, small_calib_file, tmp_path):
    teacher = tmp_path / "two-blocks"
    shutil.copytree(pruned_llama, teacher)
    config = json.loads((teacher / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (teacher / "config.json").write_text(json.dumps(config))
    tensors = load_file(teacher / "model.safetensors")
    save_file({key: value for key, value in tensors.items() if ".layers.2." not in key}, teacher / "model.safetensors",
              metadata={"format": "pt"})
    out = tmp_path / "out"
    line = one_error_line(invoke("--model", str(pruned_llama), "--data", str(small_calib_file), "--out", str(out),
                                 *FLAGS, "--loss", "kd", "--teacher", str(teacher)))
    assert "--teacher" in line and "block count is 2" in line
    assert not out.exists()


def test_retrain_lm_plus_kd_trains_and_reports_the_truncation_error(pruned_llama, tiny_model_dir, small_calib_file,
                                                                   tmp_path):
    out = tmp_path / "out"
    result = invoke("--model", str(pruned_llama), "--data", str(small_calib_file), "--out", str(out), *FLAGS,
                    "--loss", "lm+kd", "--teacher", str(tiny_model_dir("llama")), "--kd-top-k", "16")
    assert result.exit_code == 0, result.output
    report = json.loads((out / REPORT_NAME).read_text())
    distillation = report["retrain"]["distillation"]
    assert distillation["loss"] == "lm+kd" and distillation["top_k"] == 16
    assert 0 < distillation["mass_outside_top_k"]["mean"] <= distillation["mass_outside_top_k"]["max"] < 1
    assert "teacher" in report["job"]["fingerprint"] and report["job"]["teacher"] == str(tiny_model_dir("llama"))
    assert "teacher mass outside the top-16" in (out / "report.md").read_text()
    assert not (out / STATE_DIR / TEACHER_NAME).exists()  # finished: the state is dropped


KD_RUN = ("--retrain-loss", "kd", "--retrain-kd-top-k", "16", "--retrain-kd-temperature", "2")


def block_zeros(out: Path) -> dict[str, torch.Tensor]:
    """The zero masks of every block linear's weight in a model folder."""
    zeros = {}
    for shard in sorted(out.glob("model-*.safetensors")):
        for key, value in load_file(shard).items():
            if key.startswith(BLOCK_LISTS["llama"] + ".") and value.dim() == 2:
                zeros[key] = value == 0
    return zeros


def test_run_with_retrain_loss_kd_keeps_every_zero_and_resumes_to_the_same_bytes(tiny_model_dir, small_calib_file,
                                                                                tmp_path):
    model = tiny_model_dir("llama")
    reference = tmp_path / "reference"
    done = run_job_cli(reference, model, small_calib_file, None, *KD_RUN, fresh=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "out"
    killed = run_job_cli(out, model, small_calib_file, "retrain-step:2", *KD_RUN)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (out / STATE_DIR / TEACHER_NAME).is_file()  # kept for the resume
    layerwise = block_zeros(out)  # the stage has not swapped its blocks in yet
    resumed = run_job_cli(out, model, small_calib_file, None, *KD_RUN)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "teacher's top-16 read back" in resumed.stderr
    assert model_files(out) == model_files(reference)
    final = block_zeros(out)
    assert layerwise and final.keys() == layerwise.keys()
    for key, zeros in layerwise.items():
        assert zeros.any() and bool(final[key][zeros].all()), key
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["retrain"]["distillation"]["temperature"] == 2.0
    assert report["retrain"] == {**json.loads((reference / REPORT_NAME).read_text())["retrain"],
                                 **{key: report["retrain"][key] for key in
                                    ("seconds_per_step", "read_share", "tokens_per_second")}}
    assert "`--retrain-loss kd`" in (out / "report.md").read_text()
    assert not (out / STATE_DIR / TEACHER_NAME).exists()
