"""Decode target images robustly into 8-bit RGB, or say in a few words why an image cannot be used.

:func:`load_rgb` is the single entry point. It never returns a half-decoded image: the pixel data is
loaded inside the ``try`` (``Image.load()``), so truncated files are detected, and every failure
becomes an :class:`ImageDecodeError` whose ``reason`` is one of :data:`REASONS`.

Mode conversions (all to ``RGB``, 8 bits per channel)
-----------------------------------------------------
``1``, ``L``, ``P`` (palette), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``
    PIL's own conversion (gray replicated to three channels; CMYK converted naively, Adobe-inverted
    CMYK JPEGs are un-inverted by PIL's decoder).
``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La`` and palette images with a transparent colour
    Composited over **white**. Dropping the alpha channel would expose whatever colour is stored
    under fully transparent pixels (often black or arbitrary), which is not what a viewer sees.
``I;16`` / ``I;16L`` / ``I;16B`` / ``I`` (16-bit or 32-bit integer gray, e.g. 16-bit PNG)
    Values clipped to ``[0, 65535]`` and scaled by ``255 / 65535`` (rounded): a fixed, full-range
    scaling, not a per-image contrast stretch, so the result does not depend on the image content.
``F`` (32-bit float gray)
    PIL's conversion (clipped to ``[0, 255]``).

The EXIF orientation tag is **not** applied (as with PIL's and torchvision's default loaders, which
the paper's pipeline used); multi-frame files (GIF, TIFF) give their first frame.

Skip reasons
------------
``missing file``, ``not a file``, ``empty file`` (0 bytes), ``unreadable`` (permission or I/O
error), ``truncated``, ``corrupt`` (recognised format, broken data), ``unsupported format`` (PIL
cannot identify it), ``too large`` (``width * height`` above :data:`MAX_PIXELS`, checked from the
header before any pixel is decoded; PIL's ``DecompressionBombWarning``/``Error`` are caught too),
``too small`` (width or height below :data:`MIN_SIDE` = 2 pixels: a 1-pixel-wide image carries no
spatial structure and resizes to a constant or striped image).
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from conceptrank.errors import ImageDecodeError

__all__ = ["ImageDecodeError", "load_rgb", "MAX_PIXELS", "MIN_SIDE", "REASONS", "IMAGE_EXTENSIONS"]

#: Largest accepted ``width * height`` (PIL's default ``Image.MAX_IMAGE_PIXELS``). Read at call
#: time, so it can be changed (or monkeypatched in tests).
MAX_PIXELS = 89_478_485
#: Smallest accepted width and height, in pixels.
MIN_SIDE = 2

REASONS = (
    "missing file",
    "not a file",
    "empty file",
    "unreadable",
    "truncated",
    "corrupt",
    "unsupported format",
    "too large",
    "too small",
)

#: File name extensions (lower case) treated as images when scanning folders.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# Leading bytes of formats PIL reads; an unidentifiable file that starts with one is 'corrupt',
# anything else 'unsupported format'.
_MAGIC = (
    b"\xff\xd8",  # JPEG (SOI marker)
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF little endian
    b"MM\x00*",  # TIFF big endian
)

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_INT_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _looks_like_image(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    return any(head.startswith(m) for m in _MAGIC)


def _on_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert a loaded PIL image of any supported mode to a new 8-bit ``RGB`` image."""
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in im.info):
        return _on_white(im)
    if mode in _INT_GRAY_MODES:
        a = np.asarray(im).astype(np.int64)
        a = np.clip(a, 0, 65535)
        g = np.rint(a * (255.0 / 65535.0)).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(np.stack([g, g, g], axis=-1)), "RGB")
    return im.convert("RGB")


def load_rgb(
    path: str | os.PathLike,
    max_pixels: int | None = None,
    min_side: int | None = None,
) -> Image.Image:
    """Decode an image file into a new 8-bit RGB PIL image.

    Parameters
    ----------
    path : path-like
        The image file.
    max_pixels : int, optional
        Largest accepted ``width * height``; default :data:`MAX_PIXELS` (read at call time).
    min_side : int, optional
        Smallest accepted width and height; default :data:`MIN_SIDE`.

    Returns
    -------
    PIL.Image.Image
        Mode ``RGB``, size ``(W, H)`` of the file, fully loaded and detached from the file.

    Raises
    ------
    ImageDecodeError
        With ``reason`` one of :data:`REASONS` (see the module docstring).
    """
    path = Path(path)
    limit = MAX_PIXELS if max_pixels is None else int(max_pixels)
    smallest = MIN_SIDE if min_side is None else int(min_side)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageDecodeError(path, "missing file") from None
    except OSError as e:
        raise ImageDecodeError(path, "unreadable", str(e)) from None
    if not path.is_file():
        raise ImageDecodeError(path, "not a file")
    if st.st_size == 0:
        raise ImageDecodeError(path, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > limit:  # header only: nothing decoded yet
                    raise ImageDecodeError(path, "too large", f"{w}x{h} = {w * h} pixels > limit {limit}")
                if w < smallest or h < smallest:
                    raise ImageDecodeError(path, "too small", f"{w}x{h}, need at least {smallest}x{smallest}")
                im.load()  # inside the try: truncation and broken data surface here
                return _to_rgb(im)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(path, "too large", str(e)) from None
    except UnidentifiedImageError as e:
        reason = "corrupt" if _looks_like_image(path) else "unsupported format"
        raise ImageDecodeError(path, reason, str(e)) from None
    except PermissionError as e:
        raise ImageDecodeError(path, "unreadable", str(e)) from None
    except FileNotFoundError:  # removed between stat() and open()
        raise ImageDecodeError(path, "missing file") from None
    except MemoryError as e:
        raise ImageDecodeError(path, "too large", f"out of memory decoding ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError, struct.error) as e:
        msg = str(e)
        reason = "truncated" if ("truncated" in msg.lower() or isinstance(e, EOFError)) else "corrupt"
        raise ImageDecodeError(path, reason, msg or type(e).__name__) from None

