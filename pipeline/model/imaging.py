"""Decoding any image file into an RGB PIL image, the same way everywhere.

Part of the model package (Pillow and NumPy only): the logged MLflow model carries this file,
so ``sample``, the feature extraction and the logged model decode bytes identically.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.model.errors import ImageDecodeError

ImageSource = bytes | bytearray | str | os.PathLike

# What PIL raises for files that are not images, truncated, or absurdly large.
DECODE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    ValueError,
    SyntaxError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,  # raised, not warned: see load_image
)
# The largest image accepted, in pixels: PIL's own default limit, enforced as a refusal read
# from the header before anything is decoded (PIL only warns between 1x and 2x of it).
MAX_PIXELS = 89_478_485

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Transparency is composited on ``background``; 16/32-bit grayscale is scaled to 8 bits
    (PIL's own ``convert("RGB")`` clips such images to white).
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            arr = arr / 257.0
        else:
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if img.mode == "P" or img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        img = img.convert("RGBA")
        canvas = Image.new("RGB", img.size, background)
        canvas.paste(img, mask=img.getchannel("A"))
        return canvas
    return img.convert("RGB")


def load_image(source: ImageSource, min_side: int | None = None) -> Image.Image:
    """Open, fully decode and convert ``source`` (bytes or a path) to RGB.

    ``min_side``: the smallest side the caller will resize to. JPEGs are then decoded at a
    reduced DCT scale (``Image.draft``) that still keeps both sides >= ``min_side`` — several
    times faster on large photos, and identical wherever this function is used.
    Raises :class:`ImageDecodeError` for anything that is not a complete, readable image,
    and for images over :data:`MAX_PIXELS` (a decompression bomb: a few KB that decode to
    gigabytes), refused from the header before decoding.
    """
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        fh = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
    except OSError as exc:
        raise ImageDecodeError(f"{name}: cannot open ({exc.strerror or exc})") from exc
    with fh, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(fh)
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageDecodeError(
                    f"{name}: {w}x{h} pixels, over the {MAX_PIXELS:,} accepted: refused "
                    "before decoding (a decompression bomb?)")
            if min_side and img.format == "JPEG":
                w, h = img.size
                scale = min_side / min(w, h)
                img.draft("RGB", (max(1, round(w * scale)), max(1, round(h * scale))))
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
        except ImageDecodeError:
            raise
        except DECODE_ERRORS as exc:
            raise ImageDecodeError(f"{name}: not a readable image ({exc})") from exc


def is_image_file(path: str | Path) -> bool:
    """True for file names with an image extension (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS
