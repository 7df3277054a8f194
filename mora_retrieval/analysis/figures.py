"""The analysis figures as PNGs (matplotlib, Agg, no pyplot): Gram spectra and t-SNE panels."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..fileio import write_png
from .spectra import SlotSpectra

_TOWER_LABEL = {"visual": "vision", "text": "text"}


@dataclass
class ScatterPanel:
    """One t-SNE panel: 2-D points, an integer group per point (−1: none) and the group names."""

    title: str
    points: np.ndarray
    groups: np.ndarray
    group_names: Sequence[str]


def plot_spectra(spectra: Sequence[SlotSpectra], path: str | Path) -> Path:
    """One panel per slot (4 to a row, one at least): Gram eigenvalues (solid), pretrained singular values (dashed)."""
    cols = min(4, len(spectra))
    rows = math.ceil(len(spectra) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.6 * rows), dpi=90)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(spectra):]:
        ax.set_visible(False)
    for ax, slot in zip(axes, spectra):
        index = np.arange(1, len(slot.gram_vision) + 1)
        ax.plot(index, slot.gram_vision, marker="o", color="tab:blue", label="vision gram")
        ax.plot(index, slot.gram_text, marker="o", color="tab:red", label="text gram")
        for name, values in slot.pretrained.items():
            tower, proj = name.split(".")
            ax.plot(np.arange(1, len(values) + 1), values, linestyle="--", marker=".",
                    color="tab:blue" if tower == "visual" else "tab:red", alpha=0.55,
                    label=f"{_TOWER_LABEL[tower]} pre-trained W_{proj}")
        blocks = f"vision block {slot.vision_block}, text block {slot.text_block}"
        ax.set(title=f"slot {slot.slot} ({blocks})", xlabel="index", ylabel="normalised eigenvalue",
               xticks=index, ylim=(0, None))
        ax.grid(alpha=0.3)
        ax.title.set_fontsize(9)
    axes[len(spectra) - 1].legend(fontsize="x-small")
    fig.tight_layout()
    return write_png(fig, Path(path))


def plot_scatter_grid(panels: Sequence[Sequence[ScatterPanel]], path: str | Path, title: str = "") -> Path:
    """A grid of t-SNE panels (rows × columns), points coloured by group; one shared legend."""
    rows, cols = len(panels), max(len(r) for r in panels)
    fig = Figure(figsize=(4.2 * cols + 1.8, 4.0 * rows), dpi=90)
    axes = fig.subplots(rows, cols, squeeze=False)
    names = list(panels[0][0].group_names)
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            ax = axes[r][c]
            groups = np.asarray(panel.groups)
            for g in np.unique(groups):  # ascending: the points of no group (−1) first, in grey
                x, y = panel.points[groups == g].T
                ax.scatter(x, y, s=8, color="lightgrey" if g < 0 else cmap(g % cmap.N))
            ax.set_title(panel.title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    if len(names) <= 20:
        handles = [Line2D([], [], marker="o", linestyle="", color=cmap(g % cmap.N), label=name)
                   for g, name in enumerate(names)]
        fig.legend(handles=handles, loc="center right", fontsize="x-small")
        fig.subplots_adjust(right=1 - 1.6 / fig.get_figwidth())
    if title:
        fig.suptitle(title, fontsize=10)
    return write_png(fig, Path(path))
