"""The model-level LoRAPrune stage in ``report.md`` and ``loraprune.png``: sparsity schedule and loss per step."""

from __future__ import annotations

from pathlib import Path

from reconstruct.reporting.plots import _save, load_matplotlib

FIGURE_NAME = "loraprune.png"


def loraprune_section(stage: dict, figure_drawn: bool) -> list[str]:
    """Lines of ``report.md`` for ``reconstruct.json``'s ``loraprune`` record."""
    history, losses = stage.get("history", []), stage.get("loss_curve", [])
    events = ", ".join(f"{event['step'] + 1}: {event['sparsity']:.3f}" for event in history)
    lines = [
        "## Model-level LoRAPrune",
        "",
        f"LoRA on every block linear, {stage.get('steps', len(losses))} steps on the causal-LM loss over the "
        f"calibration windows ({'streamed' if stage.get('streamed') else 'resident'}); loss "
        f"{losses[0]:.4f} → {losses[-1]:.4f}." if losses else "LoRA on every block linear (no steps recorded).",
        "",
        f"Sparsity of the prunable weights after each pruning step (steps done: sparsity; the masks apply from the next step): {events or 'none'}.",
        "",
    ]
    if figure_drawn:
        lines += [f"![LoRAPrune schedule]({FIGURE_NAME})", ""]
    return lines


def plot_loraprune(stage: dict, path: Path) -> bool:
    """Sparsity after each pruning step and the training loss per step, as a PNG; False without matplotlib."""
    figure_class = load_matplotlib()
    if figure_class is None:
        return False
    history, losses = stage.get("history", []), stage.get("loss_curve", [])
    figure = figure_class(figsize=(8, 3.2))
    sparsity_axes, loss_axes = figure.subplots(1, 2)
    sparsity_axes.step([0] + [event["step"] + 1 for event in history], [0.0] + [event["sparsity"] for event in history],
                       where="post")
    sparsity_axes.set(xlabel="steps done", ylabel="sparsity of the prunable weights", title="pruning schedule")
    loss_axes.plot(range(1, len(losses) + 1), losses, marker=".")
    loss_axes.set(xlabel="step", ylabel="causal-LM loss", title="LoRA training")
    figure.tight_layout()
    _save(figure, path)
    return True
