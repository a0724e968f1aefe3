"""Read an image's format and pixel size from its first bytes, without decoding any pixels.

Only the fixed headers of PNG, GIF, BMP and WebP, and the segment chain of JPEG up to its frame
header, are parsed, so a damaged or hostile image costs a few bytes to reject.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import IO

# 40 megapixels (8000 x 5000) is beyond any camera image a classifier is trained on; a header that
# claims more is a decompression bomb or a mistake. The registry refuses it at upload and the
# worker's decoder before decoding, so both draw the line in the same place.
MAX_IMAGE_PIXELS = 40_000_000
_HEAD_BYTES = 30
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
_JPEG_START = b"\xff\xd8\xff"
# A JPEG's frame header follows its metadata segments (EXIF thumbnails are at most 64 KiB each);
# one not found in the first MiB is treated as unreadable rather than scanned for.
_JPEG_SCAN_LIMIT = 1024 * 1024
# Start-of-frame markers; C4, C8 and CC share the range but mean something else.
_JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int
    height: int


def read_image_header(stream: IO[bytes]) -> ImageHeader | None:
    """The image's format and size, or None when the bytes are not an image we accept."""
    head = stream.read(_HEAD_BYTES)
    if head.startswith(_JPEG_START):
        found = _jpeg(_PrefixedReader(head[2:], stream, _JPEG_SCAN_LIMIT))
    else:
        found = _png(head) or _gif(head) or _bmp(head) or _webp(head)
    if found is None or found.width <= 0 or found.height <= 0:
        return None
    return found


def _png(head: bytes) -> ImageHeader | None:
    if len(head) < 24 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return ImageHeader("png", width, height)


def _gif(head: bytes) -> ImageHeader | None:
    if len(head) < 10 or head[:6] not in _GIF_SIGNATURES:
        return None
    width, height = struct.unpack("<HH", head[6:10])
    return ImageHeader("gif", width, height)


def _bmp(head: bytes) -> ImageHeader | None:
    if len(head) < 26 or not head.startswith(b"BM"):
        return None
    (info_size,) = struct.unpack("<I", head[14:18])
    if info_size == 12:  # the old OS/2 header stores 16-bit sizes
        width, height = struct.unpack("<HH", head[18:22])
    elif info_size >= 40:
        width, height = struct.unpack("<ii", head[18:26])
    else:
        return None
    return ImageHeader("bmp", width, abs(height))  # a negative height means top-down rows


def _webp(head: bytes) -> ImageHeader | None:
    if len(head) < 30 or not head.startswith(b"RIFF") or head[8:12] != b"WEBP":
        return None
    chunk = head[12:16]
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", head[26:30])
        return ImageHeader("webp", width & 0x3FFF, height & 0x3FFF)
    if chunk == b"VP8L" and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return ImageHeader("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X":
        width = int.from_bytes(head[24:27], "little") + 1
        height = int.from_bytes(head[27:30], "little") + 1
        return ImageHeader("webp", width, height)
    return None


def _jpeg(reader: _PrefixedReader) -> ImageHeader | None:
    """Walk the marker segments after the start-of-image marker until a frame header."""
    while True:
        if reader.read(1) != b"\xff":
            return None
        marker = reader.read(1)
        while marker == b"\xff":  # fill bytes may pad before a marker
            marker = reader.read(1)
        if not marker:
            return None
        code = marker[0]
        if code in _JPEG_STANDALONE_MARKERS:
            continue
        if code in (0xD9, 0xDA):  # end of image, or pixel data before any frame header
            return None
        length_bytes = reader.read(2)
        if len(length_bytes) < 2:
            return None
        (length,) = struct.unpack(">H", length_bytes)
        if code in _JPEG_FRAME_MARKERS:
            frame = reader.read(5)
            if len(frame) < 5:
                return None
            _precision, height, width = struct.unpack(">BHH", frame)
            return ImageHeader("jpeg", width, height)
        if length < 2:
            return None
        reader.read(length - 2)


class _PrefixedReader:
    """Bytes already read, then the rest of the stream, up to a fixed total."""

    def __init__(self, prefix: bytes, stream: IO[bytes], limit: int) -> None:
        self._prefix = prefix
        self._stream = stream
        self._left = limit

    def read(self, size: int) -> bytes:
        size = min(size, self._left)
        taken = self._prefix[:size]
        self._prefix = self._prefix[size:]
        if len(taken) < size:
            taken += self._stream.read(size - len(taken))
        self._left -= len(taken)
        return taken
