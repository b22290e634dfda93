"""The model-level LoRAPrune stage in ``report.md`` and ``loraprune.png``: sparsity schedule, importance, loss."""

from __future__ import annotations

from pathlib import Path

from reconstruct.reporting.plots import load_matplotlib, save_figure
from reconstruct.modelio.folder_layout import LORAPRUNE_FIGURE_NAME as FIGURE_NAME



def loraprune_section(stage: dict, figure_drawn: bool) -> list[str]:
    """Lines of ``report.md`` for ``reconstruct.json``'s ``loraprune`` record."""
    history, losses = stage.get("history", []), stage.get("loss_curve", [])
    events = ", ".join(f"{event['step'] + 1}: {event['sparsity']:.3f}" for event in history)
    ratios = ", ".join(f"{event['step'] + 1}: {event['importance_ratio']:.3f}" for event in history
                       if event.get("importance_ratio") is not None)
    lines = [
        "## Model-level LoRAPrune",
        "",
        f"LoRA on every block linear, {stage.get('steps', len(losses))} steps on the causal-LM loss over the "
        f"calibration windows ({'streamed' if stage.get('streamed') else 'resident'}); loss "
        f"{losses[0]:.4f} → {losses[-1]:.4f}." if losses else "LoRA on every block linear (no steps recorded).",
        "",
        f"Sparsity of the prunable weights after each pruning step (steps done: sparsity; the masks apply from the next step): {events or 'none'}.",
        "",
        "Importance at each pruning step: the mean moving-average importance of what that step newly pruned, "
        f"divided by the mean over what it kept (below 1: it cut the least important): {ratios or 'none'}.",
        "",
    ]
    if figure_drawn:
        lines += [f"![LoRAPrune schedule]({FIGURE_NAME})", ""]
    return lines


def plot_loraprune(stage: dict, path: Path) -> bool:
    """Sparsity and importance ratio after each pruning step, training loss per step, as a PNG; False without matplotlib."""
    figure_class = load_matplotlib()
    if figure_class is None:
        return False
    history, losses = stage.get("history", []), stage.get("loss_curve", [])
    figure = figure_class(figsize=(12, 3.2))
    sparsity_axes, ratio_axes, loss_axes = figure.subplots(1, 3)
    sparsity_axes.step([0] + [event["step"] + 1 for event in history], [0.0] + [event["sparsity"] for event in history],
                       where="post")
    sparsity_axes.set(xlabel="steps done", ylabel="sparsity of the prunable weights", title="pruning schedule")
    ratios = [(event["step"] + 1, event.get("importance_ratio")) for event in history]
    ratios = [(step, ratio) for step, ratio in ratios if ratio is not None]
    ratio_axes.plot([step for step, _ in ratios], [ratio for _, ratio in ratios], marker="o")
    ratio_axes.set(xlabel="steps done", ylabel="newly pruned / kept", title="mean importance at each pruning")
    loss_axes.plot(range(1, len(losses) + 1), losses, marker=".")
    loss_axes.set(xlabel="step", ylabel="causal-LM loss", title="LoRA training")
    figure.tight_layout()
    save_figure(figure, path)
    return True
