"""Pictures, drawn with matplotlib's object API (headless Agg) and saved to files."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.errors import InputError


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _show(ax: Any, image: np.ndarray | None, title: str) -> None:
    if image is None:
        ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=9)
    elif image.ndim == 2:
        ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(image, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()


def neighbours_figure(query: np.ndarray, query_title: str, images: Sequence[np.ndarray | None], titles: Sequence[str]) -> Any:
    """A row: the query, then each neighbour in rank order, titled with its label. Returns a Figure."""
    n = len(images) + 1
    fig = _figure(1.9 * n, 2.3)
    axes = fig.subplots(1, n, squeeze=False)[0]
    _show(axes[0], query, query_title)
    for ax, img, title in zip(axes[1:], images, titles):
        _show(ax, img, title)
    fig.suptitle("query and its nearest neighbours", fontsize=11)
    return fig


def save_figure(fig: Any, out: str | os.PathLike[str]) -> Path:
    """Save ``fig`` as PNG at ``out`` (parent folders created); a clear error if not writable."""
    path = Path(out).expanduser()
    if path.suffix.lower() != ".png":
        raise InputError(f"--save {path}: give a file name ending in .png")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    except OSError as exc:
        raise InputError(f"cannot write {path} ({exc.strerror or exc}): choose a writable path") from None
    return path
