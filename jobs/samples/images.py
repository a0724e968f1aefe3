"""A synthetic image dataset for demos and tests, written without any download: three shape
classes (horizontal stripes, vertical stripes, a filled square) in random colours, positions and
noise, as a zip of PNGs in class folders or as an .npz of arrays.

The PNG encoder here is a minimal one in NumPy and zlib; it picks each row's filter the way
common encoders do, so the images exercise every filter a real PNG uses.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

CLASSES = ("horizontal", "vertical", "square")
FORMATS = ("image_folder_zip", "npz")
_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG color type
_NOISE_STD = 20.0


def write_image_sample(
    path: Path, *, per_class: int = 60, size: int = 16, seed: int = 0, fmt: str = "image_folder_zip"
) -> None:
    """Write `per_class` images of `size` x `size` pixels for each of CLASSES to `path`.

    "image_folder_zip": RGB PNGs at `<class>/<class>-<n>.png`. "npz": `x` as uint8 grayscale
    (images, size, size) and `y` as int64 class indices into CLASSES.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, not {fmt!r}.")
    if per_class < 1 or size < 8:
        raise ValueError("per_class must be at least 1 and size at least 8.")
    rng = np.random.default_rng(seed)
    images = [
        (label, _draw(label, size, rng)) for label in range(len(CLASSES)) for _ in range(per_class)
    ]
    if fmt == "npz":
        x = np.stack([image.mean(axis=2).round().astype(np.uint8) for _, image in images])
        y = np.array([label for label, _ in images], dtype=np.int64)
        with path.open("wb") as file:
            np.savez(file, x=x, y=y)
        return
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for number, (label, image) in enumerate(images):
            name = CLASSES[label]
            archive.writestr(f"{name}/{name}-{number:05d}.png", encode_png(image))


def _draw(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One RGB image of class `label`: the shape in one colour on a contrasting background."""
    rows, columns = np.mgrid[0:size, 0:size]
    if CLASSES[label] == "square":
        side = int(rng.integers(size // 3, size // 2 + 1))
        top, left = rng.integers(0, size - side + 1, size=2)
        mask = (rows >= top) & (rows < top + side) & (columns >= left) & (columns < left + side)
    else:
        period = int(rng.choice([4, 6]))
        phase = int(rng.integers(0, period))
        along = rows if CLASSES[label] == "horizontal" else columns
        mask = (along + phase) % period < period // 2
    dark, light = rng.integers(0, 100, size=3), rng.integers(156, 256, size=3)
    foreground, background = (dark, light) if rng.random() < 0.5 else (light, dark)
    image = np.where(mask[:, :, None], foreground, background).astype(np.float64)
    image += rng.normal(0.0, _NOISE_STD, size=image.shape)
    return image.clip(0, 255).round().astype(np.uint8)


def encode_png(image: np.ndarray, *, filter_type: int | None = None) -> bytes:
    """A PNG of a uint8 (height, width) or (height, width, channels) array, 1 to 4 channels.

    Each row takes the filter whose output has the smallest sum of absolute values (the usual
    heuristic), or `filter_type` (0 to 4) for every row.
    """
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError("encode_png takes a uint8 array of shape (height, width[, channels]).")
    pixels = image[:, :, None] if image.ndim == 2 else image
    height, width, channels = pixels.shape
    if channels not in _COLOR_TYPES:
        raise ValueError(f"encode_png takes 1 to 4 channels, not {channels}.")
    filtered = _filtered_rows(pixels.reshape(height, width * channels), channels)
    if filter_type is None:
        cost = np.abs(filtered.astype(np.int8).astype(np.int64)).sum(axis=2)
        choice = cost.argmin(axis=0)
    else:
        choice = np.full(height, filter_type)
    lines = np.concatenate(
        [choice.astype(np.uint8)[:, None], filtered[choice, np.arange(height)]], axis=1
    )
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOR_TYPES[channels], 0, 0, 0)
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(lines.tobytes(), 9)),
            _chunk(b"IEND", b""),
        ]
    )


def _filtered_rows(rows: np.ndarray, pixel_bytes: int) -> np.ndarray:
    """All five filters of every row, (5, height, row bytes), as the spec defines them: each
    byte minus a prediction from the original bytes to its left, above and upper left."""
    current = rows.astype(np.int16)
    above = np.zeros_like(current)
    above[1:] = current[:-1]
    left = np.zeros_like(current)
    left[:, pixel_bytes:] = current[:, :-pixel_bytes]
    upper_left = np.zeros_like(current)
    upper_left[:, pixel_bytes:] = above[:, :-pixel_bytes]
    estimate = left + above - upper_left
    to_left, to_above, to_upper_left = (
        np.abs(estimate - left),
        np.abs(estimate - above),
        np.abs(estimate - upper_left),
    )
    paeth = np.where(
        (to_left <= to_above) & (to_left <= to_upper_left),
        left,
        np.where(to_above <= to_upper_left, above, upper_left),
    )
    predictions = [np.zeros_like(current), left, above, (left + above) // 2, paeth]
    return np.stack([(current - p) % 256 for p in predictions]).astype(np.uint8)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
