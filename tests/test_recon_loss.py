"""``--recon-loss``: what reconstruction minimises and the guard judges (MSE or token-relative error)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import cli
from conftest import make_job
from reconstruct.jobs.run_job import run_job
from reconstruct.methods import ReconSpec, SampleSplit, evaluate_error, evaluate_mse, train_reconstruction
from reconstruct.methods.loss import error_terms
from reconstruct.jobs.run_fingerprint import RUN_FINGERPRINT_FLAGS
from reconstruct.state.job_diff import flag_of_field


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


class _Stream:
    def __init__(self, data: torch.Tensor) -> None:
        self.data, self.n_samples = data, data.shape[0]

    def read(self, indices):
        return self.data[indices]


def _sink_batch(generator: torch.Generator, sink: float = 1e4):
    """(n, T, H) inputs and targets of a linear map whose first token carries a massive activation."""
    inputs = torch.randn(6, 16, 8, generator=generator)  # (n, T, H)
    inputs[:, 0, 0] = sink  # the first token of every sample: one huge channel, as SmolLM2's from block 12 on
    weight = torch.randn(8, 8, generator=generator) / 3
    return inputs, inputs @ weight, weight


def test_token_relative_terms_are_each_tokens_error_over_its_energy():
    target = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]])  # (1, T=2, H=2): energies 25 and 1
    out = target + torch.tensor([[[1.0, 0.0], [0.0, 0.5]]])
    assert torch.equal(error_terms(out, target, "token-relative"), torch.tensor([[1.0 / 25.0, 0.25]]))
    assert torch.equal(error_terms(out, target, "mse"), (out - target) ** 2)
    scaled = error_terms(out * 1e3, target * 1e3, "token-relative")  # a token's term ignores its scale
    assert torch.allclose(scaled, error_terms(out, target, "token-relative"), rtol=1e-6)


def test_a_zero_target_with_a_zero_output_costs_nothing():
    zeros = torch.zeros(1, 3, 4)
    assert torch.equal(error_terms(zeros, zeros, "token-relative"), torch.zeros(1, 3))


def test_an_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="--recon-loss"):
        ReconSpec(loss="l1")
    with pytest.raises(ValueError, match="--recon-loss"):
        error_terms(torch.zeros(1, 2), torch.zeros(1, 2), "l1")


def test_evaluate_error_with_mse_is_evaluate_mse_to_the_bit():
    generator = torch.Generator().manual_seed(0)
    inputs, targets, weight = _sink_batch(generator)
    noisy = weight + torch.randn(8, 8, generator=generator) / 50

    def forward(x):
        return x @ noisy

    assert evaluate_error(forward, _Stream(inputs), _Stream(targets), 4) == evaluate_mse(
        forward, _Stream(inputs), _Stream(targets), 4)


def test_the_sink_token_dominates_the_mse_but_not_the_token_relative_error():
    generator = torch.Generator().manual_seed(1)
    inputs, targets, weight = _sink_batch(generator)
    noisy = weight + torch.randn(8, 8, generator=generator) / 50
    out = inputs @ noisy  # (n, T, H)
    mse_terms, relative_terms = error_terms(out, targets, "mse"), error_terms(out, targets, "token-relative")
    sink_share = mse_terms[:, 0].sum() / mse_terms.sum()
    assert sink_share > 0.99  # one token of 16 holds nearly all the squared error
    assert relative_terms[:, 0].sum() / relative_terms.sum() < 0.5  # relative to its energy it is one token of 16


def test_training_on_the_token_relative_loss_lowers_it_on_the_ordinary_tokens():
    generator = torch.Generator().manual_seed(2)
    inputs, targets, weight = _sink_batch(generator)
    start = weight + torch.randn(8, 8, generator=generator) / 5
    results = {}
    for loss in ("mse", "token-relative"):
        trained = torch.nn.Parameter(start.clone())

        def forward(x, trained=trained):
            return x @ trained

        spec = ReconSpec(steps=40, lr=1e-2, loss=loss, val_fraction=0.0)
        result = train_reconstruction(forward, [trained], _Stream(inputs), _Stream(targets), spec, seed=0)
        assert result.steps == 40
        ordinary = error_terms(inputs[:, 1:] @ trained.detach(), targets[:, 1:], "token-relative").mean()
        results[loss] = float(ordinary)
    before = float(error_terms(inputs[:, 1:] @ start, targets[:, 1:], "token-relative").mean())
    assert results["token-relative"] < 0.5 * before
    assert results["token-relative"] < results["mse"]  # the MSE spends its steps on the sink token


def test_the_guard_judges_by_the_chosen_loss():
    generator = torch.Generator().manual_seed(3)
    inputs, targets, weight = _sink_batch(generator)
    trained = torch.nn.Parameter(weight + torch.randn(8, 8, generator=generator) / 5)

    def forward(x):
        return x @ trained

    split = SampleSplit(torch.arange(5), torch.tensor([5]))
    spec = ReconSpec(steps=8, lr=1e-2, loss="token-relative", eval_every=4)
    before = evaluate_error(forward, _Stream(inputs), _Stream(targets), 1, rows=torch.tensor([5]), loss="token-relative")
    result = train_reconstruction(forward, [trained], _Stream(inputs), _Stream(targets), spec, seed=0, split=split)
    assert result.val_before == before
    assert [step for step, _ in result.val_curve] == [4, 8]
    assert result.val_best == min([before] + [value for _, value in result.val_curve])


def test_a_job_with_the_token_relative_loss_runs_and_a_resume_would_name_the_flag(tiny_model_dir, small_calib_file,
                                                                                 tmp_path):
    out = tmp_path / "out"
    spec = ReconSpec(method="bias-ln", steps=4, loss="token-relative")
    report = run_job(make_job(tiny_model_dir("llama"), out, "wanda", sparsity=0.5, calib=small_calib_file, recon=spec))
    assert all(block["val_before"] is not None and block["recon_kept"] is not None for block in report["blocks"])
    fingerprint = json.loads((out / "reconstruct-manifest.json").read_text())["fingerprint"]
    assert fingerprint["method"]["loss"] == "token-relative"
    assert flag_of_field("method.loss", RUN_FINGERPRINT_FLAGS) == "--recon-loss"  # a resume with another loss is refused naming it
    assert "Train: the reconstruction loss (each token's squared error over its target's" in (out / "report.md").read_text()


def test_a_bad_loss_flag_exits_2_before_any_work(tmp_path):
    result = CliRunner().invoke(cli.app, ["run", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                                          "--recon-loss", "l1"])
    assert result.exit_code == 2 and "--recon-loss" in result.output
    assert not (tmp_path / "o").exists()


def test_micro_batches_accumulate_the_token_relative_gradient_of_the_batch():
    """The same batch in slices of 1, 3 or 8 samples: the same gradient up to float32 summation order."""
    generator = torch.Generator().manual_seed(4)
    inputs, targets, weight = _sink_batch(generator)  # 6 samples
    start = weight + torch.randn(8, 8, generator=generator) / 5
    gradients = []
    for micro in (1, 3, 6):
        trained = torch.nn.Parameter(start.clone())
        seen = []
        spec = ReconSpec(steps=1, lr=1e-2, batch_size=6, micro_batch=micro, loss="token-relative", val_fraction=0.0)
        train_reconstruction(lambda x, trained=trained: x @ trained, [trained], _Stream(inputs), _Stream(targets), spec,
                             seed=0, on_gradients=lambda step, trained=trained, seen=seen: seen.append(trained.grad.clone()))
        gradients.append(seen[0])
    # Each float32 gradient is the same sum of 96 per-token terms in another order (and per-sample matmuls of
    # 8 products): within 96 roundings of the sum of the terms' magnitudes, from either side; doubled for the
    # forward's own rounding.
    term_magnitudes = torch.zeros(8, 8, dtype=torch.float64)
    for sample in range(6):
        for token in range(16):
            trained = torch.nn.Parameter(start.double().clone())
            x, y = inputs[sample, token].double(), targets[sample, token].double()
            (error_terms(x @ trained, y, "token-relative") / 96).backward()
            term_magnitudes += trained.grad.abs()
    bound = 2 * 2 * 96 * 2**-24 * term_magnitudes
    for gradient in gradients[1:]:
        assert torch.all((gradient.double() - gradients[0].double()).abs() <= bound)
    assert float(gradients[0].abs().max()) > 0
