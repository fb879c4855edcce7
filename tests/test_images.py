from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.errors import InputError
from lookalike.images import PILLOW_MAX_PIXELS, Unreadable, default_max_pixels, open_image, read_image, resize


def test_grey_colour_palette_and_16_bit(tmp_path: Path) -> None:
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(grey).save(tmp_path / "g.png")
    assert np.array_equal(read_image(tmp_path / "g.png"), grey)
    Image.fromarray(np.dstack([grey, grey // 2, grey // 3])).save(tmp_path / "c.png")
    assert read_image(tmp_path / "c.png").shape == (8, 8, 3)
    Image.fromarray(grey).convert("P").save(tmp_path / "p.png")  # a palette of greys stays grey
    assert read_image(tmp_path / "p.png").shape == (8, 8)
    deep = (grey.astype(np.uint16) * 256).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    got = read_image(tmp_path / "d.png")
    assert got.dtype == np.uint8 and got.max() == 255 and got[0, 1] > 0  # rescaled, not clipped


def test_bad_files_say_why(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    assert read_image(tmp_path / "missing.png") == Unreadable(str(tmp_path / "missing.png"), "missing")
    assert read_image(tmp_path / "empty.png").reason == "unreadable"
    assert read_image(tmp_path / "text.jpg").reason == "unreadable"
    with pytest.raises(InputError, match="give a PNG, JPEG"):
        open_image(tmp_path / "text.jpg")
    with pytest.raises(InputError, match="not found"):
        open_image(tmp_path / "missing.png")


def test_pixel_limit_is_read_from_the_header(tmp_path: Path) -> None:
    assert default_max_pixels() == PILLOW_MAX_PIXELS
    Image.new("1", (30_000, 30_000)).save(tmp_path / "bomb.png")  # 900 Mpx: Pillow itself refuses past 179 Mpx
    got = read_image(tmp_path / "bomb.png")
    assert isinstance(got, Unreadable) and got.reason == "too-large"
    assert got.detail == "900,000,000 pixels, over the limit of 89,478,485" and "--max-pixels" in got.message()
    Image.new("L", (100, 50)).save(tmp_path / "small.png")
    assert read_image(tmp_path / "small.png", max_pixels=4999).reason == "too-large"
    assert read_image(tmp_path / "small.png", max_pixels=5000).shape == (50, 100)
    with pytest.raises(InputError, match="--max-pixels must be positive"):
        read_image(tmp_path / "small.png", max_pixels=0)


def test_resize_handles_grey_colour_and_any_size() -> None:
    grey = np.zeros((40, 30), np.uint8)
    assert resize(grey, 32, "RGB").shape == (32, 32, 3)
    assert resize(np.zeros((10, 10, 3), np.uint8), 28, "L").shape == (28, 28)
    assert resize(np.zeros((5, 5, 1), np.uint8), 8, "L").shape == (8, 8)
    with pytest.raises(InputError, match="uint8"):
        resize(np.zeros((5, 5), np.float32), 8, "L")
    with pytest.raises(InputError, match="shape"):
        resize(np.zeros((5, 5, 4), np.uint8), 8, "L")


def test_a_larger_limit_does_not_change_the_default(tmp_path: Path) -> None:
    Image.new("L", (10, 10)).save(tmp_path / "s.png")
    read_image(tmp_path / "s.png", max_pixels=400_000_000)  # widens Pillow's own guard for this call's sake
    assert default_max_pixels() == PILLOW_MAX_PIXELS


def test_any_pillow_failure_is_an_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import struct

    Image.new("L", (10, 10)).save(tmp_path / "s.png")

    def damaged(*a: object, **k: object) -> None:
        raise struct.error("unpack requires a buffer of 4 bytes")  # what some damaged PNGs and TIFFs raise

    monkeypatch.setattr(Image, "open", damaged)
    got = read_image(tmp_path / "s.png")
    assert isinstance(got, Unreadable) and got.reason == "unreadable" and got.detail == "error"
