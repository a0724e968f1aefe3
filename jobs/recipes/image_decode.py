"""A small PNG decoder in NumPy and zlib, so that image recipes read tenants' images without an
imaging library: every non-interlaced PNG (grayscale, RGB, palette, with or without alpha, 1 to
16 bits) becomes a uint8 array of shape (height, width, channels).

Other image formats are recognised only to tell the tenant to convert them. The decoder checks
every chunk's CRC and never inflates more bytes than the header's size calls for, so a damaged
or hostile file costs little to reject.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The header bytes `read_png_header` needs: the signature and the whole IHDR chunk.
PNG_HEADER_BYTES = 33
# 40 megapixels (8000 x 5000) is beyond any camera image a classifier is trained on; a header that
# claims more is a decompression bomb or a mistake, and its pixels would not fit in memory.
MAX_PIXELS = 40_000_000
CONVERT_HINT = "convert the images to PNG (for example `mogrify -format png *.jpg`)"

# color type -> (samples per pixel, allowed bit depths)
_COLOR_TYPES = {
    0: (1, (1, 2, 4, 8, 16)),  # grayscale
    2: (3, (8, 16)),  # RGB
    3: (1, (1, 2, 4, 8)),  # palette index
    4: (2, (8, 16)),  # grayscale and alpha
    6: (4, (8, 16)),  # RGBA
}
_OTHER_FORMATS = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


class ImageDecodeError(ValueError):
    """The bytes are not a PNG this decoder reads; the message says why and what to do."""


@dataclass(frozen=True)
class PngHeader:
    width: int
    height: int
    bit_depth: int
    color_type: int
    interlaced: bool

    @property
    def channels(self) -> int:
        """Channels of the decoded array: palettes expand to RGB."""
        return 3 if self.color_type == 3 else _COLOR_TYPES[self.color_type][0]

    @property
    def is_color(self) -> bool:
        return self.color_type in (2, 3, 6)


def read_png_header(head: bytes) -> PngHeader:
    """The header of the PNG that starts with `head` (its first PNG_HEADER_BYTES bytes or more)."""
    if not head.startswith(PNG_SIGNATURE):
        raise ImageDecodeError(_not_png(head))
    if len(head) < PNG_HEADER_BYTES or head[12:16] != b"IHDR":
        raise ImageDecodeError("The PNG is truncated or damaged: it has no header chunk.")
    length = struct.unpack(">I", head[8:12])[0]
    (crc,) = struct.unpack(">I", head[29:33])
    if length != 13 or zlib.crc32(head[12:29]) != crc:
        raise ImageDecodeError("The PNG is damaged: its header chunk fails its checksum.")
    width, height, depth, color, compression, filtering, interlace = struct.unpack(
        ">IIBBBBB", head[16:29]
    )
    if color not in _COLOR_TYPES or depth not in _COLOR_TYPES[color][1]:
        raise ImageDecodeError(
            f"The PNG declares color type {color} with bit depth {depth}, which is not valid PNG."
        )
    if compression != 0 or filtering != 0 or interlace not in (0, 1):
        raise ImageDecodeError("The PNG declares an unknown compression, filter or interlace.")
    if not width or not height:
        raise ImageDecodeError("The PNG has no pixels (its width or height is 0).")
    if width * height > MAX_PIXELS:
        raise ImageDecodeError(
            f"The PNG is {width} x {height} pixels, over our limit of {MAX_PIXELS:,}; "
            "scale it down first."
        )
    return PngHeader(width, height, depth, color, bool(interlace))


def decode_png(data: bytes) -> np.ndarray:
    """The image as uint8 (height, width, channels): 1 gray, 2 gray and alpha, 3 RGB (palettes
    too; their transparency is ignored), 4 RGBA. 16-bit samples keep their high byte."""
    header = read_png_header(data[:PNG_HEADER_BYTES])
    if header.interlaced:
        raise ImageDecodeError(
            "The PNG is interlaced (Adam7), which this recipe does not read; "
            "save it again without interlacing."
        )
    compressed, palette = _read_chunks(data)
    samples, depth = _COLOR_TYPES[header.color_type][0], header.bit_depth
    pixel_bytes = max(1, samples * depth // 8)  # the distance the filters look back
    row_bytes = (header.width * samples * depth + 7) // 8
    rows = _unfilter(_inflate(compressed, header.height * (row_bytes + 1)), row_bytes, pixel_bytes)
    if depth == 16:
        values = rows.reshape(header.height, -1, 2)[:, :, 0]
    elif depth < 8:
        bits = np.unpackbits(rows, axis=1)[:, : header.width * depth]
        weights = (1 << np.arange(depth - 1, -1, -1)).astype(np.uint8)
        values = (bits.reshape(header.height, header.width, depth) * weights).sum(
            axis=2, dtype=np.uint8
        )
        if header.color_type == 0:
            # Stretch 1, 2 and 4-bit gray to 0-255 so that white is 255 whatever the depth.
            values = values * np.uint8(255 // ((1 << depth) - 1))
    else:
        values = rows
    image = values.reshape(header.height, header.width, samples)
    if header.color_type == 3:
        if palette is None:
            raise ImageDecodeError("The PNG uses a palette but has none (no PLTE chunk).")
        if int(image.max()) >= len(palette):
            raise ImageDecodeError("The PNG has a pixel outside its palette.")
        return palette[image[:, :, 0]]
    return image


def _not_png(head: bytes) -> str:
    for signature, name in _OTHER_FORMATS:
        if head.startswith(signature):
            return f"The file is a {name} image; this recipe reads PNG only: {CONVERT_HINT}."
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return f"The file is a WebP image; this recipe reads PNG only: {CONVERT_HINT}."
    return f"The file is not a PNG image; {CONVERT_HINT}."


def _read_chunks(data: bytes) -> tuple[bytes, np.ndarray | None]:
    """The concatenated IDAT data and the palette (entries x 3), checking every chunk's CRC."""
    idat: list[bytes] = []
    palette = None
    position = len(PNG_SIGNATURE)
    while True:
        if position + 8 > len(data):
            raise ImageDecodeError("The PNG is truncated: it ends before its IEND chunk.")
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        end = position + 12 + length
        if end > len(data):
            raise ImageDecodeError("The PNG is truncated: a chunk runs past the end of the file.")
        body = data[position + 8 : end - 4]
        if zlib.crc32(kind + body) != struct.unpack(">I", data[end - 4 : end])[0]:
            raise ImageDecodeError(f"The PNG is damaged: its {kind!r} chunk fails its checksum.")
        if kind == b"IDAT":
            idat.append(body)
        elif kind == b"PLTE":
            if length % 3 or not 0 < length <= 768:
                raise ImageDecodeError("The PNG's palette is malformed.")
            palette = np.frombuffer(body, dtype=np.uint8).reshape(-1, 3)
        elif kind == b"IEND":
            break
        position = end
    if not idat:
        raise ImageDecodeError("The PNG has no image data (no IDAT chunk).")
    return b"".join(idat), palette


def _inflate(compressed: bytes, expected: int) -> np.ndarray:
    inflater = zlib.decompressobj()
    try:
        # Never more than the header promises: a small file cannot expand into gigabytes.
        raw = inflater.decompress(compressed, expected)
    except zlib.error as exc:
        raise ImageDecodeError(f"The PNG's image data is damaged ({exc}).") from exc
    if len(raw) != expected or inflater.unconsumed_tail:
        raise ImageDecodeError(
            "The PNG's image data does not match its declared size; it is damaged."
        )
    return np.frombuffer(raw, dtype=np.uint8)


def _unfilter(raw: np.ndarray, row_bytes: int, pixel_bytes: int) -> np.ndarray:
    """Undo the per-row filters (PNG spec, section 9). None, Sub and Up are vectorised; Average
    and Paeth depend on the byte just decoded, so they run byte by byte."""
    lines = raw.reshape(-1, row_bytes + 1)
    out = np.empty((len(lines), row_bytes), dtype=np.uint8)
    previous = np.zeros(row_bytes, dtype=np.uint8)
    for index, line in enumerate(lines):
        kind, row = line[0], line[1:]
        if kind == 0:
            out[index] = row
        elif kind == 1:
            # A running sum per byte lane, modulo 256 through uint8 overflow; rows of 8 or 16-bit
            # samples hold whole pixels, and smaller samples look back a single byte.
            lanes = row.reshape(-1, pixel_bytes)
            out[index] = np.cumsum(lanes, axis=0, dtype=np.uint8).reshape(-1)
        elif kind == 2:
            out[index] = row + previous
        elif kind == 3:
            out[index] = _unfilter_average(row.tolist(), previous.tolist(), pixel_bytes)
        elif kind == 4:
            out[index] = _unfilter_paeth(row.tolist(), previous.tolist(), pixel_bytes)
        else:
            raise ImageDecodeError(f"The PNG has a row with the unknown filter type {kind}.")
        previous = out[index]
    return out


def _unfilter_average(row: list[int], above: list[int], pixel_bytes: int) -> list[int]:
    for i in range(len(row)):
        left = row[i - pixel_bytes] if i >= pixel_bytes else 0
        row[i] = (row[i] + ((left + above[i]) >> 1)) & 0xFF
    return row


def _unfilter_paeth(row: list[int], above: list[int], pixel_bytes: int) -> list[int]:
    for i in range(len(row)):
        up = above[i]
        if i < pixel_bytes:
            # With no pixel to the left, the predictor is always the one above.
            row[i] = (row[i] + up) & 0xFF
            continue
        left, upper_left = row[i - pixel_bytes], above[i - pixel_bytes]
        estimate = left + up - upper_left
        to_left, to_up, to_upper_left = (
            abs(estimate - left),
            abs(estimate - up),
            abs(estimate - upper_left),
        )
        if to_left <= to_up and to_left <= to_upper_left:
            predictor = left
        elif to_up <= to_upper_left:
            predictor = up
        else:
            predictor = upper_left
        row[i] = (row[i] + predictor) & 0xFF
    return row
