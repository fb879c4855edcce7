"""Reading image files and resizing images: the one reader path of ingest, search and the pictures.

:func:`read_image` gives a ``uint8`` array, ``(H, W)`` grey or ``(H, W, 3)`` RGB, or an
:class:`Unreadable` saying why not (missing, not an image, damaged, or over the pixel limit).
The pixel limit is checked from the file's header, before any pixel is decoded, so a
decompression bomb (a small PNG of 30,000 x 30,000 pixels) costs nothing. The default limit is
Pillow's own (``PIL.Image.MAX_IMAGE_PIXELS``, 89,478,485 pixels); ``max_pixels`` changes it.
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.errors import InputError, TooLargeError

log = logging.getLogger(__name__)

PILLOW_MAX_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS as Pillow ships it
BACKGROUND = (255, 255, 255)  # transparent pixels are read as if on white paper
_pillow_lock = threading.Lock()
_default: int | None = None  # Pillow's limit before any widening


@dataclass(frozen=True)
class Unreadable:
    """Why a file gave no image: ``reason`` is ``missing``, ``unreadable`` or ``too-large``."""

    path: str
    reason: str
    detail: str = ""

    def message(self) -> str:
        """One line naming the problem and the fix."""
        if self.reason == "missing":
            return f"image file not found: {self.path} (check the path)"
        if self.reason == "too-large":
            return f"{self.path} is too large ({self.detail}): shrink it, or raise the limit with --max-pixels N"
        return f"cannot read {self.path} as an image ({self.detail}): give a PNG, JPEG, BMP, GIF, TIFF or WebP file"


def default_max_pixels() -> int:
    """Pillow's pixel limit as this process found it (``PIL.Image.MAX_IMAGE_PIXELS`` before lookalike widened it for a
    larger ``--max-pixels``), or Pillow's shipped default when unset."""
    global _default
    from PIL import Image

    with _pillow_lock:
        if _default is None:
            _default = int(Image.MAX_IMAGE_PIXELS or PILLOW_MAX_PIXELS)
        return _default


def check_max_pixels(max_pixels: int | None) -> int:
    """The limit to use: ``max_pixels``, or Pillow's; InputError when it is not positive."""
    if max_pixels is None:
        return default_max_pixels()
    if max_pixels < 1:
        raise InputError(f"--max-pixels must be positive, got {max_pixels}")
    return int(max_pixels)


def read_image(
    path: str | os.PathLike[str] | bytes, max_pixels: int | None = None, size: int | None = None, *, name: str = "the upload"
) -> np.ndarray | Unreadable:
    """One image file (or the bytes of one, called ``name`` in messages) as ``uint8`` (H, W) grey or (H, W, 3) RGB,
    or :class:`Unreadable` (never raises on a bad file).

    ``size``: the least side to decode to (an embedder's ``EmbedderSpec.decode_side``: twice a digit-sized
    input, a photo-sized input itself). The file is then decoded straight to about that side: JPEG by Pillow's draft
    mode (a reduced-scale DCT decode, up to 8x smaller on each side), other formats by an integer box
    reduction right after decoding, never below that side on either side; no full-resolution array
    leaves this function. Read right whatever the form: the EXIF orientation is applied (a phone photo
    taken sideways comes out upright), CMYK and YCCK JPEGs
    become RGB, 16-bit images are scaled to 0-255 (not clipped), transparency is composited on
    white (``BACKGROUND``), animated GIF/WebP and multi-page TIFF give their first frame. Grey stays
    grey (also a palette image whose colours are all grey); anything else becomes RGB.
    """
    from PIL import Image

    limit = check_max_pixels(max_pixels)
    if isinstance(path, bytes):  # an upload: read from memory exactly as a file is read
        p, source = name, io.BytesIO(path)
    else:
        p = source = Path(path)
        if not p.is_file():
            return Unreadable(str(p), "missing")
    try:
        _allow(limit)
        with Image.open(source) as im:
            w, h = im.size
            if w * h > limit:
                return Unreadable(str(p), "too-large", f"{w}x{h} = {w * h:,} pixels, over the limit of {limit:,}")
            orientation = _orientation(im)
            if size and im.format in ("JPEG", "MPO"):  # MPO: the multi-picture JPEG many phones write
                im.draft(None, (size, size))  # decode at 1/2, 1/4 or 1/8 scale, still >= size on both sides
            im.load()
            return _to_array(_normal_mode(im, size), orientation)
    except Image.DecompressionBombError as exc:  # over twice Pillow's own limit: refused before the size is known
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(found.group(1)):,} pixels" if found else "a decompression bomb"
        return Unreadable(str(p), "too-large", f"{pixels}, over the limit of {limit:,}")
    except Exception as exc:  # Pillow raises OSError, SyntaxError, struct.error, IndexError... on damaged files
        log.info("unreadable image %s: %s", p, exc)
        return Unreadable(str(p), "unreadable", type(exc).__name__)


def open_image(
    path: str | os.PathLike[str] | bytes, max_pixels: int | None = None, size: int | None = None, *, name: str = "the upload"
) -> np.ndarray:
    """:func:`read_image`, raising InputError (TooLargeError over the pixel limit; one line naming the fix) when the
    file gives no image."""
    image = read_image(path, max_pixels, size, name=name)
    if isinstance(image, Unreadable):
        raise (TooLargeError if image.reason == "too-large" else InputError)(image.message())
    return image


def _allow(limit: int) -> None:
    """Let Pillow open images up to ``limit`` pixels (it refuses twice its own limit by itself).

    Pillow's warning between its limit and twice it is silenced: our limit decides, from the header.
    """
    from PIL import Image

    default_max_pixels()  # remember Pillow's own limit before changing it
    with _pillow_lock:
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # idempotent: no duplicate filter
        current = Image.MAX_IMAGE_PIXELS
        if current is not None and 2 * current < limit:
            Image.MAX_IMAGE_PIXELS = (limit + 1) // 2


def image_fields(path: str | os.PathLike[str], gps: bool = False) -> dict[str, Any]:
    """Metadata of an image file from its header alone (no decoding): ``width``, ``height`` (as stored),
    ``format``, and from EXIF where present ``taken`` (capture time, seconds since 1970 read as UTC: cameras
    record local time without a zone) with ``taken_at`` (its text), ``camera_make``, ``camera_model``,
    ``orientation``; ``latitude``/``longitude`` only with ``gps`` (personal data). ``{"format": "?"}`` for a file
    Pillow cannot open. Every value is one Chroma can store (no None)."""
    from datetime import UTC, datetime

    from PIL import Image

    try:
        with Image.open(path) as im:
            out: dict[str, Any] = {"width": int(im.width), "height": int(im.height), "format": str(im.format or "?")}
            try:
                exif = im.getexif()
                sub = exif.get_ifd(0x8769)  # the Exif IFD: DateTimeOriginal lives there
            except Exception:  # a damaged EXIF block: the header's fields only
                return out
            when = str(sub.get(0x9003) or exif.get(0x0132) or "").strip("\x00 ")
            try:
                stamp = datetime.strptime(when, "%Y:%m:%d %H:%M:%S").replace(tzinfo=UTC)
                out.update(taken=int(stamp.timestamp()), taken_at=stamp.strftime("%Y-%m-%dT%H:%M:%S"))
            except ValueError:
                pass
            for tag, key in ((0x010F, "camera_make"), (0x0110, "camera_model")):
                text = str(exif.get(tag) or "").strip("\x00 ")
                if text:
                    out[key] = text
            if exif.get(0x0112):
                out["orientation"] = int(exif.get(0x0112))
            if gps:
                out.update(_gps(exif))
            return out
    except Exception:  # not an image Pillow can open (the decoder reports it as unreadable)
        return {"format": "?"}


def _gps(exif: Any) -> dict[str, float]:
    try:
        info = exif.get_ifd(0x8825)
        lat, lat_ref, lon, lon_ref = info[2], info.get(1, "N"), info[4], info.get(3, "E")
    except Exception:
        return {}

    def degrees(dms: Any, ref: str) -> float:
        d, m, sec = (float(x) for x in dms)
        value = d + m / 60 + sec / 3600
        return -value if str(ref).upper().startswith(("S", "W")) else value

    try:
        return {"latitude": round(degrees(lat, lat_ref), 6), "longitude": round(degrees(lon, lon_ref), 6)}
    except (TypeError, ValueError, ZeroDivisionError):
        return {}


# EXIF orientation -> the transposition that makes the picture upright (as ImageOps.exif_transpose)
_UPRIGHT = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}


def _orientation(im: Any) -> int:
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # a damaged EXIF block: read the picture as stored
        return 1


_REDUCIBLE = ("L", "LA", "RGB", "RGBA", "CMYK", "I", "F")  # modes Image.reduce accepts


def _normal_mode(im: Any, size: int | None) -> Any:
    """``im`` shrunk (see :func:`_reduced`) and in ``L``, ``LA``, ``RGB`` or ``RGBA``: 16-bit scaled to 8 bits
    by its mode's range, CMYK/YCCK and colour palettes to RGB(A). Shrinking comes first where Pillow can
    (so no full-size copy is made), after the conversion where it cannot (1-bit, palettes)."""
    from PIL import Image

    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    sixteen = im.mode.startswith("I;16")
    if sixteen:
        im = im.convert("I")  # 32-bit ints, the same values
    if im.mode in _REDUCIBLE:
        im = _reduced(im, size)
    if im.mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float32)
        peak = float(a.max()) if a.size else 0.0
        if sixteen:
            top = 65535.0  # a 16-bit file: its range, whatever the content
        else:  # 32-bit ints or floats: 8-bit values as they are, wider ones by the image's own range (never clipped)
            top = 255.0 if peak <= 255 else max(65535.0, peak) if peak <= 65535 else peak
        return Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    grey = im.mode in ("1", "L", "LA", "La") or (im.mode in ("P", "PA") and not _palette_has_colour(im))
    want = ("LA" if has_alpha else "L") if grey else ("RGBA" if has_alpha else "RGB")
    if im.mode != want:
        im = im.convert(want)
    return _reduced(im, size)


def _reduced(im: Any, size: int | None) -> Any:
    """``im`` shrunk by the largest whole factor that keeps both sides >= ``size`` (box filter).

    An image already below that (a 28 px digit) is untouched, so a file of a stored array reads back as that array.
    """
    if not size:
        return im
    factor = min(im.width // size, im.height // size)
    return im.reduce(factor) if factor >= 2 else im


def _to_array(im: Any, orientation: int) -> np.ndarray:
    from PIL import Image

    if orientation in _UPRIGHT:
        im = im.transpose(getattr(Image.Transpose, _UPRIGHT[orientation]))
    if im.mode in ("LA", "RGBA"):  # transparency composited on the stated background
        rgba = im.convert("RGBA")
        flat = Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")
        im = flat.convert("L") if im.mode == "LA" else flat
    return np.asarray(im, dtype=np.uint8)


def _palette_has_colour(im: Any) -> bool:
    """Whether a palette image uses a colour that is not grey (from the palette entries it uses, no full copy)."""
    if im.mode not in ("P", "PA"):
        return False
    used = im.getcolors(256) or [(0, i) for i in range(256)]
    palette = im.getpalette() or []
    for _, index in used:
        idx = index[0] if isinstance(index, tuple) else index
        r, g, b = palette[3 * idx : 3 * idx + 3] or (0, 0, 0)
        if not r == g == b:
            return True
    return False


def as_image_array(image: Any) -> np.ndarray:
    """A caller's array as a ``uint8`` (H, W) or (H, W, 3) image; InputError naming the expected shape otherwise."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise InputError(f"images must be uint8, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3) or min(img.shape[:2]) < 1:
        raise InputError(f"an image must be (H, W) grey or (H, W, 3) RGB, got shape {img.shape}")
    return img


PAD_COLOUR = (124, 116, 104)  # the ImageNet mean (0.485, 0.456, 0.406) x 255: about zero after ImageNet normalisation


def square(pil: Any, fit: str) -> Any:
    """A Pillow image made square: ``squash`` leaves it (the resize stretches it), ``crop`` keeps its centre square
    (the shorter side whole), ``pad`` letterboxes it on :data:`PAD_COLOUR` (grey images on its grey)."""
    from PIL import Image

    w, h = pil.size
    if w == h or fit == "squash":
        return pil
    if fit == "crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        return pil.crop((left, top, left + side, top + side))
    if fit == "pad":
        side = max(w, h)
        colour: Any = round(sum(PAD_COLOUR) / 3) if pil.mode == "L" else PAD_COLOUR
        canvas = Image.new(pil.mode, (side, side), colour)
        canvas.paste(pil, ((side - w) // 2, (side - h) // 2))
        return canvas
    raise InputError(f"--fit {fit!r} is not one of squash, crop, pad")


def resize(image: np.ndarray, size: int, mode: str, fit: str = "squash") -> np.ndarray:
    """One image as float32 ``(size, size)`` grey (mode "L") or ``(size, size, 3)`` RGB, 0-255 (bilinear, Pillow),
    made square first as ``fit`` says (:func:`square`)."""
    from PIL import Image

    pil = Image.fromarray(as_image_array(image))
    if mode == "L" and pil.mode != "L":
        pil = pil.convert("L")
    pil = square(pil, fit)
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.BILINEAR)
    out = np.asarray(pil, dtype=np.float32)
    if mode == "RGB" and out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=2)
    return out
