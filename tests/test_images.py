from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.data.images import PAD_COLOUR, PILLOW_MAX_PIXELS, Unreadable, default_max_pixels, open_image, read_image, resize
from lookalike.errors import InputError, TooLargeError


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
    assert got.dtype == np.uint8 and np.abs(got.astype(int) - grey).max() <= 1  # the 16-bit range scaled, not clipped


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


def digit() -> np.ndarray:
    """A 60x40 grey picture with a bright bar near the top: its orientation is easy to see."""
    img = np.full((60, 40), 30, np.uint8)
    img[5:15, 10:30] = 250
    return img


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    upright = Image.fromarray(digit())
    sideways = upright.transpose(Image.Transpose.ROTATE_90)  # what the sensor stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view": what phones write for a sideways shot
    sideways.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    got = read_image(tmp_path / "phone.jpg")
    assert got.shape == (60, 40) and got[5:15, 10:30].mean() > 200 and got[45:55, 10:30].mean() < 60


def test_cmyk_and_ycck_jpegs_become_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)  # red in print colours
    assert read_image(tmp_path / "cmyk.jpg")[8, 8].tolist() == pytest.approx([255, 0, 0], abs=3)
    r, g, b = 200.0, 30.0, 60.0  # YCCK: the YCbCr of the colour and black, in an Adobe JPEG with transform 2
    ycc = (0.299 * r + 0.587 * g + 0.114 * b, 128 - 0.168736 * r - 0.331264 * g + 0.5 * b, 128 + 0.5 * r - 0.418688 * g - 0.081312 * b)
    buf = tmp_path / "ycck.jpg"
    Image.new("CMYK", (16, 16), (*(round(c) for c in ycc), 0)).save(buf, quality=100)
    data = bytearray(buf.read_bytes())
    data[data.find(b"Adobe") + 11] = 2
    buf.write_bytes(bytes(data))
    with Image.open(buf) as im:
        assert im.info.get("adobe_transform") == 2
    assert read_image(buf)[8, 8].tolist() == pytest.approx([200, 30, 60], abs=4)


def test_transparency_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:5, :, 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    got = read_image(tmp_path / "a.png")
    assert got[2, 2].tolist() == [255, 0, 0] and got[8, 8].tolist() == [255, 255, 255]
    la = Image.fromarray(np.dstack([np.zeros((10, 10), np.uint8), rgba[..., 3]]), "LA")
    la.save(tmp_path / "la.png")
    grey = read_image(tmp_path / "la.png")
    assert grey.shape == (10, 10) and grey[2, 2] == 0 and grey[8, 8] == 255
    pal = Image.fromarray(digit()).convert("P")
    pal.info["transparency"] = int(np.asarray(pal)[0, 0])  # the background colour's index is transparent
    pal.save(tmp_path / "p.png", transparency=pal.info["transparency"])
    assert read_image(tmp_path / "p.png")[30, 5] == 255 and read_image(tmp_path / "p.png")[8, 20] == 250


def test_first_frame_of_animations_and_pages(tmp_path: Path) -> None:
    frames = [Image.fromarray(np.full((12, 12, 3), v, np.uint8)) for v in (40, 200)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(tmp_path / "a.webp", save_all=True, append_images=frames[1:], duration=100, lossless=True)
    frames[0].save(tmp_path / "a.tiff", save_all=True, append_images=frames[1:])
    for name in ("a.gif", "a.webp", "a.tiff"):
        with Image.open(tmp_path / name) as im:
            assert getattr(im, "n_frames", 1) == 2, name
        assert int(read_image(tmp_path / name).mean()) == pytest.approx(40, abs=2), name


def test_large_files_are_decoded_near_the_embedder_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    photo = np.clip(rng.normal(128, 40, (1200, 1800, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "p.jpg", quality=90)
    Image.fromarray(photo).save(tmp_path / "p.png")
    for name, most in (("p.jpg", 1800 // 8), ("p.png", 1800 // 18 + 1)):
        got = read_image(tmp_path / name, size=64)  # (a 32 px embedder decodes to twice its side)
        assert got.shape[0] >= 64 and got.shape[1] >= 64 and got.shape[1] <= most, (name, got.shape)
    small = np.zeros((28, 28), np.uint8)
    Image.fromarray(small).save(tmp_path / "digit.png")
    assert read_image(tmp_path / "digit.png", size=16).shape == (28, 28)  # below the decode side: as stored
    full = read_image(tmp_path / "p.jpg")
    assert full.shape == (1200, 1800, 3)
    assert read_image(tmp_path / "p.jpg", size=64).shape == read_image(tmp_path / "p.jpg", size=64).shape  # deterministic


def test_mpo_phone_jpegs_are_drafted_too(tmp_path: Path) -> None:
    big = Image.fromarray(np.full((1200, 1600, 3), 120, np.uint8))
    big.save(tmp_path / "a.mpo", format="MPO", save_all=True, append_images=[big])
    with Image.open(tmp_path / "a.mpo") as im:
        assert im.format == "MPO"
    got = read_image(tmp_path / "a.mpo", size=64)
    assert 64 <= got.shape[0] <= 1200 // 4 and int(got.mean()) == pytest.approx(120, abs=2)


def test_16_bit_values_follow_the_files_range_not_its_content(tmp_path: Path) -> None:
    Image.fromarray(np.full((8, 8), 200, np.uint16)).save(tmp_path / "dim.png")  # a dark 16-bit picture
    assert read_image(tmp_path / "dim.png").max() <= 1
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / "white.png")
    assert read_image(tmp_path / "white.png").min() == 255


def test_bytes_read_as_the_file_reads(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)).save(tmp_path / "a.jpg", quality=90)
    data = (tmp_path / "a.jpg").read_bytes()
    assert np.array_equal(read_image(data, size=64), read_image(tmp_path / "a.jpg", size=64))
    bad = read_image(b"GIF89a nonsense", name="the upload x.gif")
    assert isinstance(bad, Unreadable) and bad.reason == "unreadable" and "cannot read the upload x.gif" in bad.message()
    Image.new("1", (12_000, 12_000)).save(tmp_path / "bomb.png")
    with pytest.raises(TooLargeError, match="too large"):
        open_image((tmp_path / "bomb.png").read_bytes())


def test_fit_squash_crop_and_pad() -> None:
    """A 60x30 picture (left half dark, right half bright, a red centre mark) made 20 px square three ways."""
    img = np.zeros((30, 60, 3), np.uint8)
    img[:, 30:] = 200
    img[10:20, 25:35] = (255, 0, 0)
    squash, crop, pad = (resize(img, 20, "RGB", fit) for fit in ("squash", "crop", "pad"))
    assert np.array_equal(squash, resize(img, 20, "RGB"))  # the default of earlier releases
    centre = img[:, 15:45]  # the centre square, resized alone
    assert np.array_equal(crop, np.asarray(Image.fromarray(centre).resize((20, 20), Image.BILINEAR), np.float32))
    assert np.allclose(pad[0, 10], PAD_COLOUR) and np.allclose(pad[-1, 10], PAD_COLOUR)  # letterboxed above and below
    assert pad[10, 2].max() < 10 and pad[10, -3].min() > 190  # the whole width kept
    assert crop[10, 0].max() < 10 and crop[10, -1].min() > 190 and crop[10, 10, 0] > 200  # the centre square, mark in the middle
    grey = resize(img[..., 0], 20, "L", "pad")
    assert grey.shape == (20, 20) and grey[0, 0] == round(sum(PAD_COLOUR) / 3)
    with pytest.raises(InputError, match="--fit"):
        resize(img, 20, "RGB", "stretch")


def test_photo_sizes_decode_to_the_size_itself(tmp_path: Path) -> None:
    """From 112 px up a JPEG is decoded to no less than the embedder's side (not twice it): a 1600x1200 photo at 224 px
    comes out at 1/4 scale (400x300); at 32 px, as before, at 1/8 then halved (100x75, both sides >= 64). A record of an
    earlier release (no ``decode``) keeps twice the side at any size."""
    from lookalike.models.embedder import EmbedderSpec, make_spec

    new, digits = make_spec("resnet50", weights="random", input_size=224), make_spec("vgg16", weights="random")
    old = EmbedderSpec.from_dict({k: v for k, v in make_spec("vgg16", weights="random", input_size=224).to_dict().items() if k != "decode"})
    assert (new.decode_side, digits.decode_side, old.decode_side) == (224, 64, 448)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (1200, 1600, 3), dtype=np.uint8)).save(tmp_path / "p.jpg", quality=85)
    assert read_image(tmp_path / "p.jpg", size=new.decode_side).shape == (300, 400, 3)
    assert read_image(tmp_path / "p.jpg", size=digits.decode_side).shape == (75, 100, 3)
    assert read_image(tmp_path / "p.jpg", size=old.decode_side).shape == (600, 800, 3)  # as that collection was read
    Image.fromarray(rng.integers(0, 255, (1200, 1600, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png", size=new.decode_side).shape == (240, 320, 3)  # reduce(5): both sides still >= 224
