"""``report.md`` and ``report.png`` of a ``reconstruct retrain`` job, from its ``reconstruct.json`` content."""

from __future__ import annotations

from pathlib import Path

from reconstruct.reporting.plots import draw_training_curve, load_matplotlib, save_figure
from reconstruct.modelio.folder_layout import FIGURE_NAME, MARKDOWN_NAME
from reconstruct.atomic import atomic_write_bytes
from reconstruct.evaluation.tasks import describe_results


def plot_training(retrain: dict, path: Path) -> bool:
    """Training loss per step and held-out loss per evaluation, as a PNG; False without matplotlib."""
    Figure = load_matplotlib()
    if Figure is None:
        return False
    figure = Figure(figsize=(7, 4))
    draw_training_curve(figure.add_subplot(1, 1, 1), retrain)
    save_figure(figure, path)
    return True


def retrain_lines(retrain: dict, job: dict) -> list[str]:
    """Markdown bullets on a retraining: method, budget, trainables, speed, held-out verdict.

    Args:
        retrain: the ``retrain`` section of ``reconstruct.json`` (a ``RetrainResult``).
        job: the settings (``RetrainSpec`` fields: method, batch, lr, warmup, weight_decay).
    """
    lines = [
        f"- method: {job['method']}, {retrain['steps']} steps of {job['batch']} windows, lr {job['lr']:g} "
        f"(warm-up {job['warmup']:.0%}, linear decay), weight decay {job['weight_decay']:g}",
        f"- trainable parameters: {retrain['trainable_params']:,} ({retrain['trainable_share']:.4%} of the blocks')",
        f"- path: {'streamed, one block at a time' if retrain['streamed'] else 'resident'}; "
        f"{retrain['seconds_per_step']:.2f} s per step, {retrain['read_share']:.0%} of it reading weights, "
        f"{retrain['tokens_per_second']:.0f} tokens/s",
        "- training loss per step: " + ", ".join(f"{loss:.4f}" for loss in retrain["loss_curve"]),
        *distillation_lines(retrain.get("distillation")),
    ]
    if retrain["val_before"] is not None:
        verdict = (f"kept the trainables of step {retrain['best_step']}" if retrain["kept"]
                   else "not better than the untrained model: the input was written unchanged")
        lines.append(f"- held-out loss: {retrain['val_before']:.4f} untrained → {retrain['val_best']:.4f} best ({verdict})")
    return lines


def distillation_lines(distillation: dict | None) -> list[str]:
    """The loss line of a distilled retraining (none for ``lm``): settings and the top-k's truncation error."""
    if not distillation:
        return []
    outside = distillation["mass_outside_top_k"]
    return [f"- loss: {distillation['loss']} (KL from the dense teacher's top-{distillation['top_k']} next-token "
            f"probabilities at temperature {distillation['temperature']:g}, scaled by T²); teacher mass outside the "
            f"top-{distillation['top_k']}: mean {outside['mean']:.2%}, max {outside['max']:.2%} per token "
            "(the truncation error)"]


def render_retrain_markdown(report: dict, figure_drawn: bool) -> str:
    """The text of ``report.md`` for a ``reconstruct retrain`` job."""
    job = report["job"]
    lines = [
        "# reconstruct retrain",
        "",
        f"- model: `{job['model']}` (block linears {report['input_block_sparsity']:.2%} zero, kept exactly)",
        f"- data: `{job['data']}`, {job['n_windows']} windows of {job['seq_len']} tokens, "
        f"{job['val_fraction']:.3g} held out",
        *retrain_lines(report["retrain"], job),
    ]
    evaluation = report.get("evaluation")
    if evaluation:
        lines.append(f"- perplexity on `{evaluation['data']}` ({evaluation['windows']} windows): "
                     f"{evaluation['perplexity_before']:.3f} before → {evaluation['perplexity_after']:.3f} after")
    lines += task_lines(report.get("task_evaluation"))
    if figure_drawn:
        lines += ["", f"![training curve]({FIGURE_NAME})"]
    return "\n".join(lines) + "\n"


def task_lines(task_evaluation: dict | None) -> list[str]:
    """``--eval-tasks`` before and after retraining: one line per task and model."""

    if not task_evaluation:
        return []
    lines = []
    for when in ("before", "after"):
        lines += [f"- {task} {when}: {text}" for task, text in describe_results(task_evaluation[when])]
    return lines


def run_retrain_section(report: dict) -> list[str]:
    """``report.md`` lines of ``run``'s retraining stage (empty when the job had none)."""
    retrain, settings = report.get("retrain"), report.get("job", {}).get("retrain")
    if not retrain or not settings:
        return []
    before = report.get("evaluation_before_retrain")
    distilled = retrain.get("distillation")
    loss = f"`--retrain-loss {distilled['loss']}`" if distilled else "the causal-LM loss"
    lines = ["## Model-level retraining", "",
             f"After the layer-wise loop, every block's parameters were trained at once on {loss} "
             "(`--retrain-*`); the numbers in Totals describe the final model; its loss curve is the bottom "
             "panel of report.png.", "", *retrain_lines(retrain, settings)]
    if before:
        lines.append(f"- perplexity after the layer-wise step, before retraining: {before['perplexity']:.3f}")
    return lines + [""]


def write_retrain_report(out: Path, report: dict) -> bool:
    """Write ``report.md`` (and ``report.png`` when matplotlib is installed); returns whether the figure was drawn."""
    drawn = plot_training(report["retrain"], out / FIGURE_NAME)
    atomic_write_bytes(out / MARKDOWN_NAME, render_retrain_markdown(report, drawn).encode())
    return drawn
