"""``curves.png``: train loss and validation metrics per epoch (matplotlib, no pyplot)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ..fileio import write_png


def plot_curves(history: list[dict[str, Any]], path: Path, main_metric: str) -> None:
    """Two panels (train loss; validation metrics) written atomically to ``path``."""
    fig = Figure(figsize=(10, 4), dpi=80)
    loss_ax, val_ax = fig.subplots(1, 2)
    epochs = [record["epoch"] for record in history]
    loss_ax.plot(epochs, [record["train_loss"] for record in history], marker="o")
    loss_ax.set(title="train loss", xlabel="epoch", ylabel="loss")
    names = sorted({k for r in history for k, v in r["val"].items() if isinstance(v, (int, float))})
    for name in names:
        points = [(r["epoch"], r["val"][name]) for r in history if name in r["val"]]
        style = {"linewidth": 2.5} if name == main_metric else {"linewidth": 1, "alpha": 0.8}
        val_ax.plot(*zip(*points), marker="o", label=name, **style)
    val_ax.set(title=f"validation (main: {main_metric})", xlabel="epoch")
    if names:
        val_ax.legend(fontsize="small")
    for ax in (loss_ax, val_ax):
        ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.9, wspace=0.2)
    write_png(fig, path)
