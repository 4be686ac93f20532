"""Loss curves as a PNG: training and validation loss of every data set, by step.

matplotlib is an optional extra (requirements-plot.txt); everything else in the
program runs without it. ``loss_curves`` is pure and reads the folder's ``History``
(``history.json``); ``draw_loss_plot`` draws what it returns and writes the PNG atomically.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from engine.folder.records import History
from engine.runtime import storage


class PlotUnavailable(ValueError):
    """matplotlib is not installed."""


@dataclass
class LossCurve:
    """One data set's curves: training loss per step while it was trained on, and its validations."""

    name: str
    train_steps: list[int] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)


def loss_curves(history: History) -> list[LossCurve]:
    """Split the history into one curve per data set, in the order they were first trained.

    A step belongs to the run that started last before it (``runs[i].start_step`` is the
    global step a run started from); validations name their data set.

    >>> from engine.folder.records import EvalResult, RunRecord, StepRecord
    >>> h = History(steps=[StepRecord(1, 4.0, 0.1), StepRecord(2, 3.0, 0.1), StepRecord(3, 5.0, 0.1)],
    ...             runs=[RunRecord("a", 0, 1, 100), RunRecord("b", 2, 1, 100)],
    ...             evals=[EvalResult(3.5, 33.1, 1.2, 50, step=2, dataset="a")])
    >>> [(c.name, c.train_steps, c.val_losses) for c in loss_curves(h)]
    [('a', [1, 2], [3.5]), ('b', [3], [])]
    """
    curves: dict[str, LossCurve] = {}
    runs = sorted(history.runs, key=lambda r: r.start_step)
    for run in runs:
        curves.setdefault(run.name, LossCurve(run.name))
    i = 0
    for record in history.steps:
        while i + 1 < len(runs) and record.step > runs[i + 1].start_step:
            i += 1
        name = runs[i].name if runs else "training"
        curve = curves.setdefault(name, LossCurve(name))
        curve.train_steps.append(record.step)
        curve.train_losses.append(record.loss)
    for e in history.evals:
        name = e.dataset or "training"
        curve = curves.setdefault(name, LossCurve(name))
        curve.val_steps.append(e.step)
        curve.val_losses.append(e.val_loss)
    return list(curves.values())


def draw_loss_plot(history: History, png_path: str | Path, title: str = "Loss") -> Path:
    """Draw the curves of ``history`` into ``png_path``; returns the path."""
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable("drawing the loss curves needs matplotlib: "
                              "pip install -r requirements-plot.txt") from None
    matplotlib.use("Agg")  # no display needed
    from matplotlib.figure import Figure

    curves = loss_curves(history)
    if not any(c.train_steps or c.val_steps for c in curves):
        raise ValueError("there is no loss to plot yet; train the model first")
    fig = Figure(figsize=(9, 5), dpi=100)
    ax = fig.add_subplot()
    colors = matplotlib.colormaps["tab10"]
    for i, curve in enumerate(curves):
        color = colors(i % 10)
        if curve.train_steps:
            ax.plot(curve.train_steps, curve.train_losses, color=color, alpha=0.6, linewidth=1,
                    label=f"{curve.name} (training)")
        if curve.val_steps:
            ax.plot(curve.val_steps, curve.val_losses, color=color, marker="o", linewidth=2,
                    label=f"{curve.name} (validation)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    storage.write_bytes(png_path, buf.getvalue())
    return Path(png_path)
