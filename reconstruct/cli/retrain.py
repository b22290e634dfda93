"""``reconstruct retrain``: model-level retraining of a pruned folder (PERP's global step)."""

from __future__ import annotations

import typer

from reconstruct.cli.main import app, setup_logging
from reconstruct.cli.errors import EXIT_INTERRUPTED, guarded
from reconstruct.cli.job_options import EVALUATION
from reconstruct.cli.options import NPROC, PROCESS, command, command_line, spec_options, values
from reconstruct.config import EvalSpec
from reconstruct.evaluation.tasks import TaskEvalSpec
from reconstruct.jobs.retrain_job import RetrainJob, run_retrain
from reconstruct.parallel import distributed
from reconstruct.parallel.launch import relaunch
from reconstruct.retrain.spec import RetrainSpec
from reconstruct.state.out_folder import check_out_folder

RETRAIN = (*spec_options(RetrainJob, "model", "data", "out"), *spec_options(RetrainSpec),
           *spec_options(RetrainJob, exclude=("model", "data", "out")), *EVALUATION, *PROCESS)


def retrain_job(params: dict) -> RetrainJob:
    """The RetrainJob of ``retrain``'s flags."""
    spec = RetrainSpec(**values(RetrainSpec, params, RETRAIN))
    evaluation = values(EvalSpec, params, RETRAIN)
    tasks = values(TaskEvalSpec, params, RETRAIN)
    return RetrainJob(**values(RetrainJob, params, RETRAIN), spec=spec,
                      evaluation=EvalSpec(**evaluation) if "data" in evaluation else None,
                      task_evaluation=TaskEvalSpec.from_flags(tasks.get("tasks"), tasks.get("task_data"),
                                                              evaluation.get("max_windows")))


def relaunch_command(params: dict) -> list[str]:
    """``retrain`` and its flags that differ from their defaults, ``--nproc`` left out (what torchrun starts)."""
    return ["retrain", *command_line((option for option in RETRAIN if option is not NPROC), params)]


def _report(out, report: dict) -> None:
    """One line on the finished job: steps, final loss, perplexity before → after, and whether training was kept."""
    result = report["retrain"]
    evaluated = report.get("evaluation")
    score = (f", perplexity {evaluated['perplexity_before']:.3f} → {evaluated['perplexity_after']:.3f}"
             if evaluated else "")
    kept = "" if result["kept"] else "; training did not beat the untrained model on held-out text, input kept"
    prefix = f"{out} already holds this finished job" if report.get("already_finished") else f"wrote {out}"
    typer.echo(f"{prefix} ({result['steps']} steps, final loss {result['loss_curve'][-1]:.4f}{score}{kept}; "
               "see report.md)")


@command(app, "retrain", RETRAIN)
def retrain(params: dict) -> None:
    """Retrain the whole pruned model end to end (PERP's global step), keeping every zero; streamed when it does not fit."""
    setup_logging(params["verbose"])
    out = values(RetrainJob, params, RETRAIN)["out"]

    def build_and_run():

        check_out_folder(out)
        job = retrain_job(params)
        if params["nproc"] > 1 and not distributed.launched():  # under torchrun already: torchrun decides
            raise typer.Exit(relaunch(params["nproc"], relaunch_command(params)))
        try:
            report = run_retrain(job)
        except KeyboardInterrupt:
            typer.echo(f"\ninterrupted; the same command continues from the last checkpoint in {out}", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        if "retrain" in report:  # the main rank
            _report(out, report)

    guarded(build_and_run, out=out)
