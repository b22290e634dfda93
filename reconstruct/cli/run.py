"""``reconstruct run``: prune, repair and write a model folder (the flags: ``job_options.RUN``)."""

from __future__ import annotations

from pathlib import Path

import typer

from reconstruct.cli.main import app, setup_logging
from reconstruct.cli.errors import guarded, stop_interrupted
from reconstruct.cli.job_options import RUN, build_job, default_out, memory_budget, relaunch_command
from reconstruct.cli.options import command
from reconstruct.jobs.run_job import run_job
from reconstruct.parallel import distributed
from reconstruct.parallel.launch import relaunch
from reconstruct.shrink import SHRUNK_DIR, shrink_folder
from reconstruct.state.out_folder import check_out_folder


@command(app, "run", RUN)
def run(params: dict) -> None:
    """Prune every linear layer of every block, reconstruct, and write a loadable model folder (+ report.md, report.png)."""
    setup_logging(params["verbose"])

    def build_and_run():

        job = build_job(params)
        check_out_folder(job.out)
        if params["nproc"] > 1 and not distributed.launched():  # under torchrun already: torchrun decides
            raise typer.Exit(relaunch(params["nproc"], relaunch_command(params)))
        try:
            report = run_job(job, memory_budget(params))
        except KeyboardInterrupt:
            stop_interrupted(job.out)
        if not distributed.is_main():
            return  # rank 0 reports
        evaluated = report.get("evaluation")
        score = f", perplexity {evaluated['perplexity']:.3f}" if evaluated else ""
        summary = f"mean linear sparsity {report.get('mean_linear_sparsity', 0):.4f}{score}; see report.md"
        if report.get("already_finished"):
            typer.echo(f"{job.out} already holds this finished job; its model files were not rewritten ({summary})")
        else:
            typer.echo(f"wrote {job.out} ({summary})")
        if job.shrink:

            echo_shrunk(job.out / SHRUNK_DIR, shrink_folder(job.out, job.out / SHRUNK_DIR))

    guarded(build_and_run, out=params["out"] or default_out(params))


def echo_shrunk(out: Path, summary: dict) -> None:
    """One line on a shrunk folder: parameters and weight bytes before and after."""
    params, size = summary["parameters"], summary["file_bytes"]
    typer.echo(f"wrote {out} (shrunk: {params['after']:,} parameters, was {params['before']:,}; "
               f"weight files {size['after'] / 2**20:.1f} MiB, was {size['before'] / 2**20:.1f} MiB)")
