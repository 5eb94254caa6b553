"""The one plotting style of the analysis figures: modest size (dpi 100, so REPORT.md's links render quickly on
GitHub), one colour per variant in every figure, atomic writes."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.io import atomic_path  # noqa: E402

DPI = 100
STYLE = {"font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "legend.fontsize": 7, "xtick.labelsize": 7,
         "ytick.labelsize": 7, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
         "axes.spines.right": False, "figure.dpi": DPI}
ALERT = "#c0392b"   # collapse flags, abnormal spans


def figure(rows: int = 1, cols: int = 1, panel: tuple[float, float] = (3.2, 2.6), **kwargs):
    """A grid of panels, each `panel` inches; always returns a 2-D array of axes."""
    plt.rcParams.update(STYLE)
    fig, axes = plt.subplots(rows, cols, figsize=(panel[0] * cols, panel[1] * rows), squeeze=False,
                             layout="constrained", **kwargs)
    return fig, axes


def save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def placeholder(path: Path, message: str) -> Path:
    """A small figure saying why there is nothing to show (so every declared output and report link exists)."""
    fig, axes = figure(1, 1, panel=(5.0, 1.2))
    axes[0, 0].axis("off")
    axes[0, 0].text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    return save(fig, path)


def variant_colors(all_variants: Sequence[str]) -> dict[str, tuple]:
    """A fixed colour per variant name, by its position in params.yaml's `variants`, so that a variant looks the
    same in every figure whichever subset a figure shows."""
    palette = plt.get_cmap("tab20").colors
    return {name: palette[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20] for i, name in enumerate(all_variants)}


def to_image(frame) -> np.ndarray:
    """A frame [C, H, W] in [-1, 1], a tensor or an array (BGR order when colour) -> an array imshow draws: [H, W]
    grey or [H, W, 3] RGB. Tensors are recognised by their `detach`, so that figure-only stages need not import
    torch."""
    array = frame.detach().cpu().float().numpy() if hasattr(frame, "detach") else np.asarray(frame)
    array = np.clip((array + 1.0) / 2.0, 0.0, 1.0)
    return array[0] if array.shape[0] == 1 else array[::-1].transpose(1, 2, 0)


def show_image(ax, image: np.ndarray, title: str = "", cmap: str = "gray", vmax: float | None = 1.0) -> None:
    # nearest: a small frame is shown as its pixels (and its PNG stays small)
    ax.imshow(image, cmap=cmap if image.ndim == 2 else None, vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def shade_abnormal(ax, frames: np.ndarray, labels: np.ndarray, label: str | None = "abnormal (ground truth)") -> None:
    """Shade each run of consecutive abnormal frames."""
    order = np.argsort(frames)
    frames, labels = np.asarray(frames)[order], np.asarray(labels)[order]
    start = None
    for i, (frame, abnormal) in enumerate(zip(frames, labels)):
        if abnormal and start is None:
            start = frame
        last = i == len(frames) - 1
        if start is not None and (not abnormal or last):
            end = frame if abnormal else frames[i - 1]
            ax.axvspan(start - 0.5, end + 0.5, color=ALERT, alpha=0.15, lw=0, label=label)
            label, start = None, None
