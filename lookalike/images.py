"""Reading image files and resizing images: the one reader path of ingest, search and the pictures.

:func:`read_image` gives a ``uint8`` array, ``(H, W)`` grey or ``(H, W, 3)`` RGB, or an
:class:`Unreadable` saying why not (missing, not an image, damaged, or over the pixel limit).
The pixel limit is checked from the file's header, before any pixel is decoded, so a
decompression bomb (a small PNG of 30,000 x 30,000 pixels) costs nothing. The default limit is
Pillow's own (``PIL.Image.MAX_IMAGE_PIXELS``, 89,478,485 pixels); ``max_pixels`` changes it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.errors import InputError

log = logging.getLogger(__name__)

PILLOW_MAX_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS as Pillow ships it
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


def read_image(path: str | os.PathLike[str], max_pixels: int | None = None) -> np.ndarray | Unreadable:
    """One image file as ``uint8`` (H, W) grey or (H, W, 3) RGB, or :class:`Unreadable` (never raises on a bad file).

    Grey stays grey (also a palette image whose colours are all grey); 16- and 32-bit images are
    rescaled to 0-255, not clipped; anything else becomes RGB.
    """
    from PIL import Image

    p = Path(path)
    limit = check_max_pixels(max_pixels)
    if not p.is_file():
        return Unreadable(str(p), "missing")
    try:
        _allow(limit)
        with Image.open(p) as im:
            w, h = im.size
            if w * h > limit:
                return Unreadable(str(p), "too-large", f"{w}x{h} = {w * h:,} pixels, over the limit of {limit:,}")
            im.load()
            return _to_array(im)
    except Image.DecompressionBombError as exc:  # over twice Pillow's own limit: refused before the size is known
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)):,} pixels" if found else "a decompression bomb"
        return Unreadable(str(p), "too-large", f"{size}, over the limit of {limit:,}")
    except Exception as exc:  # Pillow raises OSError, SyntaxError, struct.error, IndexError... on damaged files
        log.info("unreadable image %s: %s", p, exc)
        return Unreadable(str(p), "unreadable", type(exc).__name__)


def open_image(path: str | os.PathLike[str], max_pixels: int | None = None) -> np.ndarray:
    """:func:`read_image`, raising InputError (one line naming the fix) when the file gives no image."""
    image = read_image(path, max_pixels)
    if isinstance(image, Unreadable):
        raise InputError(image.message())
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


def _to_array(im: Any) -> np.ndarray:
    if im.mode in ("1", "L", "LA", "I", "I;16", "F", "P") and not _palette_has_colour(im):
        grey = _to_uint8(im) if im.mode in ("I", "I;16", "F") else im.convert("L")  # 16/32-bit: rescale, not clip
        return np.asarray(grey, dtype=np.uint8)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _palette_has_colour(im: Any) -> bool:
    if im.mode != "P":
        return False
    rgb = np.asarray(im.convert("RGB"))
    return bool((rgb[..., 0] != rgb[..., 1]).any() or (rgb[..., 1] != rgb[..., 2]).any())


def _to_uint8(im: Any) -> Any:
    from PIL import Image

    a = np.asarray(im, dtype=np.float64)
    hi = a.max() if a.size and a.max() > 255 else 255.0
    return Image.fromarray(np.clip(a * (255.0 / hi), 0, 255).astype(np.uint8))


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


def resize(image: np.ndarray, size: int, mode: str) -> np.ndarray:
    """One image as float32 ``(size, size)`` grey (mode "L") or ``(size, size, 3)`` RGB, 0-255 (bilinear, Pillow)."""
    from PIL import Image

    pil = Image.fromarray(as_image_array(image))
    if mode == "L" and pil.mode != "L":
        pil = pil.convert("L")
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.BILINEAR)
    out = np.asarray(pil, dtype=np.float32)
    if mode == "RGB" and out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=2)
    return out
