from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.analysis.plots import bars_figure, confusion_figure, gallery_figure, map_figure, neighbours_figure, pairs_figure, save_figure
from lookalike.errors import InputError


def test_map_figure_has_every_point_and_a_legend_of_names() -> None:
    coords = np.random.default_rng(0).random((30, 2))
    labels = np.repeat([0, 2, 3], 10)
    fig = map_figure(coords, labels, ["zero", "one", "two", "three"], "t")
    ax = fig.axes[0]
    assert sum(len(c.get_offsets()) for c in ax.collections) == 30
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["zero", "two", "three"]


def test_grey_images_are_shown_in_grey() -> None:
    img = np.zeros((28, 28), np.uint8)
    fig = neighbours_figure(img, "query", [img, None], ["a", "b"])
    assert len(fig.axes) == 3
    assert fig.axes[0].images[0].get_cmap().name == "gray"
    assert gallery_figure([img] * 5, list("abcde"), "g", columns=4).axes[4].get_title() == "e"
    assert len(pairs_figure([(img, img, "1 -> 7")] * 3, "p").subfigs) >= 3


def test_confusion_and_bars() -> None:
    fig = confusion_figure([[5, 1], [0, 4]], ["cat", "dog"], "c")
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert texts == {"5", "1", "4"}
    bars = bars_figure(["a", "b", "c"], {"1-NN": [0.9, 0.8, 0.7], "5-NN": [0.91, 0.82, 0.75]}, "b", "accuracy")
    assert len(bars.axes[0].patches) == 6


def test_save_figure(tmp_path: Path) -> None:
    fig = confusion_figure([[1]], ["x"], "c")
    out = save_figure(fig, tmp_path / "sub" / "c.png")
    with Image.open(out) as im:
        assert im.format == "PNG"
    with pytest.raises(InputError, match=r"\.png"):
        save_figure(fig, tmp_path / "c.svg")
