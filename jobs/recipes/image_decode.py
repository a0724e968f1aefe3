"""Decode the images of an image dataset with Pillow: the formats the registry accepts (PNG,
JPEG, GIF, BMP and WebP; the first frame of an animation) become uint8 arrays of shape
(height, width, channels), 1 gray, 2 gray and alpha, 3 RGB or 4 RGBA.

Only those five of Pillow's plugins are tried. An image over MAX_IMAGE_PIXELS, the registry's
own bound at upload, is refused from its header before any pixel is decoded, and Pillow's
decompression-bomb guard stays on (its warning made an error), so a hostile file costs little.
Pillow is imported inside the functions: the web process imports the recipes to read their
schemas and never decodes an image.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING

import numpy as np

from registry.formats.image_headers import MAX_IMAGE_PIXELS

if TYPE_CHECKING:
    from PIL import Image as PILImage

PILLOW_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")
ACCEPTED_IMAGES = "PNG, JPEG, GIF, BMP or WebP"
# Modes that hold no colour: their images may train a one-channel model.
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_KEPT_MODES = frozenset({"L", "LA", "RGB", "RGBA"})
# What a damaged file makes Pillow's plugins raise, besides its own errors.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error)


class ImageDecodeError(ValueError):
    """The bytes are not an image this recipe reads; the message says why and what to do."""


def image_is_color(stream: IO[bytes]) -> bool:
    """Whether the image in `stream` holds colour, from its header alone (its size is checked
    on the way)."""
    with _opened(stream) as image:
        return image.mode not in _GRAY_MODES


def decode_image(data: bytes) -> np.ndarray:
    """The image as uint8 (height, width, channels). Palettes become RGB (RGBA when they mark a
    transparent colour), 16-bit gray keeps its high byte, CMYK and YCbCr become RGB."""
    with _opened(io.BytesIO(data)) as image:
        try:
            image.load()
            pixels = _pixels(image)
        except _DECODE_ERRORS as exc:
            raise ImageDecodeError(f"The image is damaged or truncated ({exc}).") from exc
    return pixels


@contextmanager
def _opened(stream: IO[bytes]) -> Iterator[PILImage.Image]:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(stream, formats=PILLOW_FORMATS)
    except Image.UnidentifiedImageError as exc:
        raise ImageDecodeError(
            f"The file is not a readable {ACCEPTED_IMAGES} image (another format, or a damaged "
            "header); convert or export it again."
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"The image has too many pixels ({exc}); scale it down.") from exc
    except _DECODE_ERRORS as exc:
        raise ImageDecodeError(f"The image is damaged or truncated ({exc}).") from exc
    with image:
        if not image.width or not image.height:
            raise ImageDecodeError("The image has no pixels (its width or height is 0).")
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ImageDecodeError(
                f"The image is {image.width} x {image.height} pixels, over our limit of "
                f"{MAX_IMAGE_PIXELS:,}; scale it down first."
            )
        yield image


def _pixels(image: PILImage.Image) -> np.ndarray:
    mode = image.mode
    if mode.startswith("I"):
        wide = np.asarray(image).astype(np.int64)
        return np.clip(wide >> 8, 0, 255).astype(np.uint8)[..., None]
    if mode == "1":
        image = image.convert("L")
    elif mode == "PA" or (mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    elif mode not in _KEPT_MODES:
        image = image.convert("RGB")
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[..., None] if pixels.ndim == 2 else pixels
