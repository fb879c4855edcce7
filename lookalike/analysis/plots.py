"""Pictures, drawn with matplotlib's object API (headless Agg) and saved to files."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.errors import InputError
from lookalike.util import label_name


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
        raise InputError(f"{path}: give a picture file name ending in .png")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    except OSError as exc:
        raise InputError(f"cannot write {path} ({exc.strerror or exc}): choose a writable path") from None
    return path


def _label_colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def map_figure(coords: np.ndarray, labels: np.ndarray, label_names: Sequence[str], title: str) -> Any:
    """A 2-D scatter ``coords`` ``(n, 2)`` coloured by label, with a legend of label names."""
    fig = _figure(9, 7.5)
    ax = fig.subplots()
    present = sorted(set(int(v) for v in labels))
    colours = _label_colours(max(max(present) + 1, 1) if present else 1)
    size = 4 if len(coords) > 5000 else 9
    for lab in present:
        pts = coords[labels == lab]
        name = label_name(label_names, lab)  # "unlabelled" for an unlabelled collection's items
        ax.scatter(pts[:, 0], pts[:, 1], s=size, color=colours[max(lab, 0)], label=name, alpha=0.7, linewidths=0)
    ax.legend(title="label", loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=3, fontsize=9, frameon=False)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("component 1")
    ax.set_ylabel("component 2")
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


def _grid(n: int, columns: int) -> tuple[int, int]:
    """(columns, rows) of a grid holding ``n`` panels (at least one), at most ``columns`` wide."""
    n = max(n, 1)
    columns = min(columns, n)
    return columns, (n + columns - 1) // columns


def gallery_figure(images: Sequence[np.ndarray | None], titles: Sequence[str], title: str, columns: int = 8) -> Any:
    """A grid of images (grey in grey scale), each titled; ``title`` on top. Returns a Figure."""
    columns, rows = _grid(len(images), columns)
    fig = _figure(1.45 * columns, 1.65 * rows + 0.5)
    axes = fig.subplots(rows, columns, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < len(images):
            _show(ax, images[i], titles[i])
        else:
            ax.set_axis_off()
    fig.suptitle(title, fontsize=11)
    return fig


def pairs_figure(pairs: Sequence[tuple[np.ndarray | None, np.ndarray | None, str]], title: str, columns: int = 4) -> Any:
    """Pairs side by side (query | neighbour), each pair captioned, e.g. ``"7 -> 1"``. Returns a Figure."""
    columns, rows = _grid(len(pairs), columns)
    fig = _figure(2.9 * columns, 1.75 * rows + 0.5)
    grids = fig.subfigures(rows, columns, squeeze=False)
    for i, sub in enumerate(grids.flat):
        axes = sub.subplots(1, 2)
        if i < len(pairs):
            query, neighbour, caption = pairs[i]
            _show(axes[0], query, "held out")
            _show(axes[1], neighbour, "nearest")
            sub.suptitle(caption, fontsize=10)
        else:
            for ax in axes:
                ax.set_axis_off()
    fig.suptitle(title, fontsize=11)
    return fig


def confusion_figure(confusion: Sequence[Sequence[int]], label_names: Sequence[str], title: str) -> Any:
    """The confusion matrix (rows true, columns predicted) as a picture with counts. Returns a Figure."""
    m = np.asarray(confusion)
    n = len(m)
    names = list(label_names) if len(label_names) == n else [str(i) for i in range(n)]
    fig = _figure(max(5.0, 0.6 * n + 2.5), max(4.5, 0.55 * n + 2))
    ax = fig.subplots()
    rates = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if m[i, j]:
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=8, color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), names, rotation=45 if max(map(len, names)) > 2 else 0, ha="right" if max(map(len, names)) > 2 else "center")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=11)
    fig.colorbar(im, ax=ax, label="share of the true class")
    return fig


def bars_figure(names: Sequence[str], series: dict[str, Sequence[float]], title: str, ylabel: str) -> Any:
    """Grouped horizontal bars: one group per name, one bar per series. Returns a Figure."""
    fig = _figure(9, 1.0 + 0.55 * len(names) * max(1, len(series)))
    ax = fig.subplots()
    height = 0.8 / max(1, len(series))
    y = np.arange(len(names))
    for i, (label, values) in enumerate(series.items()):
        bars = ax.barh(y + i * height, values, height=height, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=8, padding=2)
    import textwrap

    ax.set_yticks(y + height * (len(series) - 1) / 2, [textwrap.fill(n, 42) for n in names], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel(ylabel)
    low = min((v for values in series.values() for v in values), default=0.0)
    ax.set_xlim(max(0.0, np.floor((low - 0.03) * 20) / 20), 1.012)  # differences of a point or two stay visible
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08 - 0.3 / max(1, len(names))), ncols=len(series), fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=11)  # centred on the figure, not on axes pushed right by long names
    return fig


def audit_figure(rows: Sequence[tuple[str, Sequence[tuple[np.ndarray | None, str]]]], title: str, columns: int = 6) -> Any:
    """One row per entry: its title, then up to ``columns`` captioned images (an item and its neighbours, or a group). Returns a Figure."""
    fig = _figure(1.7 * columns, 2.0 * max(len(rows), 1) + 0.5)
    subs = fig.subfigures(max(len(rows), 1), 1, squeeze=False)
    for sub, (row_title, cells) in zip(subs.flat, rows):
        axes = sub.subplots(1, columns, squeeze=False)[0]
        for ax, cell in zip(axes, list(cells) + [None] * (columns - len(cells))):
            if cell is None:
                ax.set_axis_off()
            else:
                _show(ax, cell[0], cell[1])
                ax.title.set_fontsize(8)
        sub.suptitle(row_title, fontsize=9, x=0.02, ha="left")
    fig.suptitle(title, fontsize=11)
    return fig
