"""``reconstruct plan``: the memory plan of ``run`` with the same flags, doing no work."""

from __future__ import annotations

from pathlib import Path

import typer

from reconstruct.cli.main import app, setup_logging
from reconstruct.cli.errors import EXIT_PLAN_DOES_NOT_FIT, guarded
from reconstruct.cli.job_options import PLAN, build_job, memory_budget
from reconstruct.cli.options import command, own_option
from reconstruct.flags import Flag
from reconstruct.jobs.loraprune_stage import stage_spec
from reconstruct.modelio.loaded import load_model
from reconstruct.planner import plan_from_config
from reconstruct.retrain.memory import stage_plan

CONFIG = own_option(Flag("--config", "Plan from this config.json alone (no weights needed).",
                         show_default="--model's config"), Path, None)


@command(app, "plan", (CONFIG, *PLAN))
def plan(params: dict) -> None:
    """Print the memory plan of `run` with the same flags (block, streams, working set, peaks), doing no work.

    With --retrain-steps (and with --loraprune-objective model), also that training stage's memory on
    both paths (resident, streamed) and the one it would take (needs --model: the sizes come from its
    checkpoint).

    --device auto plans for a GPU when this machine has one or --gpu-memory is given, else for the CPU.
    Exit code 0 when the plan fits its budgets, 3 when it does not, 2 on bad input.
    """
    setup_logging(params["verbose"])
    config = params["config"]

    def show():

        job = build_job(params)
        memory_plan = plan_from_config(job, config, memory_budget(params))
        typer.echo(memory_plan.format())
        fits = memory_plan.fits
        for text, stage_fits in _stage_plans(job, config):
            typer.echo(text)
            fits = fits and stage_fits
        if not fits:
            raise typer.Exit(EXIT_PLAN_DOES_NOT_FIT)

    guarded(show)


def _stage_plans(job, config: Path | None) -> list[tuple[str, bool]]:
    """The training stages' plans (``retrain.memory.stage_plan``) and whether each fits.

    Model-level LoRAPrune (before the block loop) and ``--retrain-steps`` (after it) run on the same
    trainer; their sizes come from the model's checkpoint, so ``--config`` alone cannot plan them.
    """
    stages = []
    if job.prune.model_level_loraprune:

        stages.append(("LoRAPrune stage (--loraprune-objective model)", stage_spec(job)))
    if job.retrain is not None:
        stages.append(("retraining stage", job.retrain))
    if not stages:
        return []
    if config is not None:
        return [(f"{title}: not planned from --config alone (its sizes come from the checkpoint; give --model)", True)
                for title, _ in stages]

    loaded = load_model(job.model, job.device, job.dtype)
    return [stage_plan(spec, loaded, title) for title, spec in stages]
