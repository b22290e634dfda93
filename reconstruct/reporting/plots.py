"""Figures for the run report and the sweep (matplotlib is an optional extra: ``pip install 'reconstruct[plot]'``).

Every function returns False, drawing nothing, when matplotlib is not installed. Figures are built
with ``matplotlib.figure.Figure`` and the Agg canvas directly: no pyplot, no global backend state.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

from reconstruct.atomic import atomic_write_bytes

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'reconstruct[plot]'  (or: pip install matplotlib)"
PNG_DPI = 120
PNG_METADATA = {"Software": None}  # no version string in the file: same inputs, same bytes
SWEEP_LINESTYLES = (("-", "o"), ("--", "D"), (":", "s"), ("-.", "^"))  # per pattern: line, marker
LOG_SCALE_RATIO = 3.0  # sweep: log perplexity axis when the largest value is this many times the smallest


def load_matplotlib():
    """``matplotlib.figure.Figure``, or None when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401  (the parent first: a missing package fails here)
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure


def matplotlib_available() -> bool:
    """True when figures can be drawn."""
    return load_matplotlib() is not None


def save_figure(figure, path: Path) -> None:
    """Write ``figure`` to ``path`` as a PNG, atomically, with fixed metadata (same bytes for the same figure).

    Args:
        figure: a matplotlib ``Figure`` (drawn on an Agg canvas here, no display needed).
        path: the PNG to write.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=PNG_DPI, metadata=PNG_METADATA)
    atomic_write_bytes(path, buffer.getvalue())


def draw_training_curve(axes, retrain: dict) -> None:
    """Model-level retraining on ``axes``: training loss per step, held-out loss per evaluation, the step kept.

    Args:
        axes: a matplotlib ``Axes``.
        retrain: the ``retrain`` section of ``reconstruct.json`` (a ``RetrainResult``).
    """
    steps = list(range(1, len(retrain["loss_curve"]) + 1))
    axes.plot(steps, retrain["loss_curve"], label="training loss (the step's windows)")
    if retrain["val_curve"]:
        val_steps, val_losses = zip(*retrain["val_curve"])
        axes.plot(val_steps, val_losses, "o--", label="held-out loss")
        if retrain.get("best_step") is not None:
            axes.axvline(retrain["best_step"], color="grey", linestyle=":", label=f"kept: step {retrain['best_step']}")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("mean token cross-entropy")
    axes.set_title("model-level retraining")
    axes.legend()


def plot_blocks(rows: list[dict], title: str, target_sparsity: float | None, path: Path,
                retrain: dict | None = None, validation_loss: str = "mse") -> bool:
    """Per-block reconstruction MSE (before / after), held-out validation error, and sparsity, as a PNG.

    Args:
        rows: one dict per block with ``index``, ``mse_before``, ``mse_after``, ``sparsity`` and, when
            the job held out samples, ``val_before``, ``val_after``, ``recon_kept``.
        title: figure title.
        target_sparsity: drawn as a dashed line on the sparsity panel (None: not drawn). Rows whose
            ``target_sparsity`` differs from it (``--allocation``) get their own target marked on their bar.
        path: where the PNG goes (written atomically).
        retrain: the ``retrain`` section of a run with ``--retrain-steps``: its loss curve is drawn in a
            third panel (``draw_training_curve``); None: two panels.
        validation_loss: the job's ``--recon-loss``; the validation error is drawn on the MSE's axis
            when it is the MSE, else on an axis of its own.

    Returns:
        False (and nothing written) when matplotlib is missing.
    """
    Figure = load_matplotlib()
    if Figure is None:
        return False
    figure, mse_axes, sparsity_axes = _block_figure(Figure, retrain)
    index = [row["index"] + 1 for row in rows]  # numbered from 1, as in the log, report.md and status
    _draw_block_errors(mse_axes, rows, index, validation_loss)
    _draw_block_sparsity(sparsity_axes, rows, index, target_sparsity)
    figure.suptitle(title)
    save_figure(figure, path)
    return True


def _block_figure(Figure, retrain: dict | None):
    """``(figure, mse_axes, sparsity_axes)``; with ``retrain``, a third panel holds its loss curve."""
    if retrain:
        figure = Figure(figsize=(8, 9), layout="constrained")
        mse_axes, sparsity_axes, training_axes = figure.subplots(3, 1, height_ratios=(2, 1, 1.5))
        mse_axes.sharex(sparsity_axes)  # blocks; the training panel's axis is the optimizer step
        mse_axes.tick_params(labelbottom=False)
        draw_training_curve(training_axes, retrain)
    else:
        figure = Figure(figsize=(8, 6), layout="constrained")
        mse_axes, sparsity_axes = figure.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    return figure, mse_axes, sparsity_axes


def _draw_block_errors(mse_axes, rows: list[dict], index: list[int], validation_loss: str) -> None:
    """MSE before/after per block, and the validation error on the same axis (MSE) or its own."""
    before = [row["mse_before"] for row in rows]
    after = [row["mse_after"] for row in rows]
    if all(value is None for value in before + after):  # a plain prune without --track-error
        mse_axes.text(0.5, 0.5, "block error not measured\n(--method none; add --track-error)",
                      ha="center", va="center", transform=mse_axes.transAxes)
    else:
        nan = float("nan")
        mse_axes.plot(index, [nan if v is None else v for v in before], marker="o", label="before reconstruction")
        mse_axes.plot(index, [nan if v is None else v for v in after], marker="s", label="after reconstruction")
        shown = before + after
        validated = any(row.get("val_before") is not None for row in rows)
        if validation_loss == "mse" or not validated:
            shown += _plot_validation(mse_axes, rows)
            handles, labels = mse_axes.get_legend_handles_labels()
        else:  # another quantity: its own axis, on the right
            handles, labels = _draw_validation_axis(mse_axes, rows, validation_loss)
        if all(value is not None and value > 0 for value in shown):
            mse_axes.set_yscale("log")
        mse_axes.legend(handles, labels)
    mse_axes.set_ylabel("block output MSE\n(pruned vs dense)")
    mse_axes.grid(True, alpha=0.3)


def _draw_validation_axis(mse_axes, rows: list[dict], validation_loss: str):
    """The validation error on a right-hand axis; returns one legend's handles and labels for both axes."""
    validation_axes = mse_axes.twinx()
    drawn = _plot_validation(validation_axes, rows)
    if drawn and all(value > 0 for value in drawn):
        validation_axes.set_yscale("log")
    validation_axes.set_ylabel(f"validation error\n({validation_loss})")
    mse_handles, mse_labels = mse_axes.get_legend_handles_labels()
    val_handles, val_labels = validation_axes.get_legend_handles_labels()
    return mse_handles + val_handles, mse_labels + val_labels


def _draw_block_sparsity(sparsity_axes, rows: list[dict], index: list[int], target_sparsity: float | None) -> None:
    """Sparsity bars, the job's target dashed, and each block's own target under ``--allocation``."""
    from matplotlib.ticker import MaxNLocator  # matplotlib is optional (load_matplotlib checked it)

    sparsity_axes.bar(index, [row["sparsity"] for row in rows], color="tab:gray")
    targets = [row.get("target_sparsity") for row in rows]
    if target_sparsity is not None and any(t is not None and t != target_sparsity for t in targets):
        # --allocation: every block has its own target, drawn on its bar; the job's mean dashed
        sparsity_axes.scatter(index, [float("nan") if t is None else t for t in targets], marker="_", s=400,
                              color="tab:red", zorder=3, label="block target")
        sparsity_axes.axhline(target_sparsity, color="tab:red", linestyle="--", linewidth=1, label="mean target")
        sparsity_axes.legend(loc="lower right")
    elif target_sparsity is not None:
        sparsity_axes.axhline(target_sparsity, color="tab:red", linestyle="--", linewidth=1, label="target")
        sparsity_axes.legend(loc="lower right")
    sparsity_axes.set_ylim(0, 1)
    sparsity_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    sparsity_axes.set_ylabel("sparsity")
    sparsity_axes.set_xlabel("block (from 1)")


def _plot_validation(axes, rows: list[dict]) -> list[float]:
    """Held-out error before / after each repair (dashed), undone repairs crossed; returns the values drawn."""
    measured = [row for row in rows if row.get("val_before") is not None and row.get("val_after") is not None]
    if not measured:
        return []
    index = [row["index"] + 1 for row in measured]  # numbered from 1, as the MSE curve
    axes.plot(index, [row["val_before"] for row in measured], linestyle="--", marker=".", color="tab:green",
              label="validation before")
    axes.plot(index, [row["val_after"] for row in measured], linestyle="--", marker="^", color="tab:red",
              label="validation after")
    undone = [row for row in measured if row.get("recon_kept") is False]
    if undone:
        axes.scatter([row["index"] + 1 for row in undone], [row["val_after"] for row in undone], marker="x", s=80,
                     color="black", zorder=3, label="repair undone")
    return [row["val_before"] for row in measured] + [row["val_after"] for row in measured]


def plot_sweep(rows: list[dict], path: Path) -> bool:
    """Perplexity vs sparsity: one panel per pruner, one line per method and pattern (unstructured solid).

    Args:
        rows: sweep rows with ``pruner``, ``pattern``, ``sparsity``, ``method``, ``perplexity``.
        path: where the PNG goes (written atomically).

    Returns:
        False (and nothing written) when matplotlib is missing.
    """
    Figure = load_matplotlib()
    if Figure is None:
        return False
    from matplotlib.ticker import FuncFormatter

    pruners = list(dict.fromkeys(row["pruner"] for row in rows))  # grid order
    methods = list(dict.fromkeys(row["method"] for row in rows))
    values = [row["perplexity"] for row in rows if row["perplexity"] is not None]
    log_scale = bool(values) and min(values) > 0 and max(values) / min(values) > LOG_SCALE_RATIO
    figure = Figure(figsize=(5 * len(pruners), 4), layout="constrained")
    axes_list = figure.subplots(1, len(pruners), sharey=True, squeeze=False)[0]
    patterns = list(dict.fromkeys(row["pattern"] for row in rows))
    colors = {method: f"C{i}" for i, method in enumerate(methods)}
    styles = {pattern: SWEEP_LINESTYLES[i % len(SWEEP_LINESTYLES)] for i, pattern in
              enumerate(sorted(patterns, key=lambda p: p != "unstructured"))}  # unstructured: solid
    for axes, pruner in zip(axes_list, pruners):
        for method in methods:
            for pattern in patterns:
                points = sorted(
                    (row["sparsity"], row["perplexity"]) for row in rows
                    if (row["pruner"], row["method"], row["pattern"]) == (pruner, method, pattern)
                    and row["perplexity"] is not None
                )
                if not points:
                    continue
                xs, ys = zip(*points)
                linestyle, marker = styles[pattern]
                label = method if pattern == "unstructured" else f"{method} ({pattern})"
                axes.plot(xs, ys, marker=marker, linestyle=linestyle, color=colors[method], label=label)
        axes.set_title(pruner)
        axes.set_xlabel("sparsity")
        if log_scale:
            axes.set_yscale("log")
            plain = FuncFormatter(lambda value, _: f"{value:g}")
            axes.yaxis.set_major_formatter(plain)
            axes.yaxis.set_minor_formatter(plain)
        axes.grid(True, alpha=0.3)
        axes.legend()
    axes_list[0].set_ylabel("perplexity")
    save_figure(figure, path)
    return True
