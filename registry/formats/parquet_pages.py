"""Measure a Parquet file from its page headers before a single page is decompressed.

The footer's sizes are the uploader's word; the page headers are what the decoder obeys: it
allocates each page's declared uncompressed size and refuses data that would expand past it, and
decodes each data page's declared number of values. Walking every column chunk's pages (the byte
ranges the decoder will read) therefore bounds what decoding can cost, whatever the footer says:
no page may expand past MAX_PAGE_BYTES or compress more than MAX_COMPRESSION_RATIO, and the pages
together may not expand past the file's budget.

Page headers are Thrift compact-protocol structs (parquet.thrift: PageHeader); only sizes and
value counts are read, everything else is skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import pyarrow.parquet as pq

from registry.formats.archives import (
    MAX_COMPRESSION_RATIO,
    RATIO_CHECKED_FROM_BYTES,
    expansion_budget,
)
from registry.formats.base import DatasetFormatError, DatasetLimits

# A page is a unit the decoder holds whole; writers cut them at about 1 MiB by default.
MAX_PAGE_BYTES = 64 * 1024 * 1024
# Values in one page, times their decoded width: a page of dictionary indices may legitimately
# hold millions of values, but not billions.
MAX_DECODED_PAGE_BYTES = 4 * MAX_PAGE_BYTES
MAX_PAGES = 500_000
# Arrow refuses page headers over 16 MiB (statistics make them grow); so do we.
_MAX_HEADER_BYTES = 16 * 1024 * 1024
_FIRST_HEADER_READ = 4 * 1024
_FIXED_WIDTHS = {"BOOLEAN": 1, "INT32": 4, "INT64": 8, "INT96": 12, "FLOAT": 4, "DOUBLE": 8}
# Decoded byte arrays are read as dictionary indices or offsets: 4 bytes a value, plus the
# value bytes themselves, which the page's own size bounds.
_BYTE_ARRAY_WIDTH = 4
# Thrift compact types.
_STOP, _TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY = range(9)
_LIST, _SET, _MAP, _STRUCT = 9, 10, 11, 12
_MAX_NESTING = 16


def check_pages(
    file: BinaryIO, metadata: pq.FileMetaData, *, file_bytes: int, limits: DatasetLimits
) -> int:
    """Walk every page header of every column chunk; raise DatasetFormatError on the first page
    or total that breaks a bound, else return the bytes all pages expand to."""
    budget = expansion_budget(file_bytes, limits)
    pages = uncompressed = decoded = 0
    schema = metadata.schema
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for index in range(row_group.num_columns):
            chunk = row_group.column(index)
            column = schema.column(index)
            width = _decoded_width(column)
            for page in _pages(file, chunk, file_bytes):
                pages += 1
                if pages > MAX_PAGES:
                    raise DatasetFormatError(
                        f"The Parquet file has more than {MAX_PAGES:,} pages; write it with "
                        "larger pages or row groups (pyarrow's defaults, for example)."
                    )
                page_decoded = page.values * width
                _check_page(page, page_decoded, chunk.path_in_schema)
                uncompressed += page.uncompressed
                decoded += page_decoded
                if uncompressed > budget or decoded > limits.max_uncompressed_bytes:
                    raise _expands_too_far(max(uncompressed, decoded), file_bytes, budget)
    return uncompressed


@dataclass(frozen=True)
class _Page:
    uncompressed: int
    compressed: int
    values: int


def _pages(file: BinaryIO, chunk: pq.ColumnChunkMetaData, file_bytes: int) -> Iterator[_Page]:
    """The column chunk's pages, from the byte range the decoder reads for it."""
    start = chunk.data_page_offset
    if chunk.has_dictionary_page and 0 < chunk.dictionary_page_offset < start:
        start = chunk.dictionary_page_offset
    end = start + chunk.total_compressed_size
    if start < 4 or chunk.total_compressed_size <= 0 or end > file_bytes:
        raise _damaged(f"column {chunk.path_in_schema!r} points outside the file")
    position = start
    while position < end:
        header, header_bytes = _read_page_header(file, position, end)
        position += header_bytes + header.compressed
        if position > end:
            raise _damaged(f"a page of column {chunk.path_in_schema!r} runs past its chunk")
        yield header


def _check_page(page: _Page, decoded: int, column: str) -> None:
    if page.uncompressed > MAX_PAGE_BYTES:
        raise DatasetFormatError(
            f"A page of column {column!r} expands to {page.uncompressed:,} bytes; we accept "
            f"pages of at most {MAX_PAGE_BYTES:,}. Write the file with smaller pages (pyarrow "
            "cuts them at 1 MiB by default) and no single value that large."
        )
    if page.uncompressed >= RATIO_CHECKED_FROM_BYTES and page.uncompressed > (
        MAX_COMPRESSION_RATIO * max(page.compressed, 1)
    ):
        raise DatasetFormatError(
            f"A page of column {column!r} compresses more than {MAX_COMPRESSION_RATIO}:1, which "
            "real data does not; it looks like a decompression bomb. Export the real data again."
        )
    if decoded > MAX_DECODED_PAGE_BYTES:
        raise DatasetFormatError(
            f"A page of column {column!r} holds {page.values:,} values, which decode to "
            f"{decoded:,} bytes; we accept at most {MAX_DECODED_PAGE_BYTES:,} a page. Write the "
            "file with smaller pages."
        )


def _decoded_width(column: pq.ColumnSchema) -> int:
    if column.physical_type == "FIXED_LEN_BYTE_ARRAY":
        return max(column.length, 1)
    return _FIXED_WIDTHS.get(column.physical_type, _BYTE_ARRAY_WIDTH)


def _read_page_header(file: BinaryIO, position: int, end: int) -> tuple[_Page, int]:
    """The page header at `position` and its length in bytes; headers carry statistics of any
    size, so the read grows until the header fits (up to Arrow's own limit)."""
    size = _FIRST_HEADER_READ
    while True:
        file.seek(position)
        data = file.read(min(size, end - position))
        try:
            reader = _CompactReader(data)
            fields = reader.struct()
            break
        except _Truncated:
            if size >= _MAX_HEADER_BYTES or len(data) < size:
                raise _damaged("a page header is cut short") from None
            size *= 4
        except ValueError as exc:
            raise _damaged(f"a page header cannot be read ({exc})") from None
    kind, uncompressed, compressed = fields.get(1), fields.get(2), fields.get(3)
    if not all(isinstance(value, int) for value in (kind, uncompressed, compressed)):
        raise _damaged("a page header lacks its type or sizes")
    if uncompressed < 0 or compressed < 0:
        raise _damaged("a page header declares a negative size")
    detail = next((fields[key] for key in (5, 7, 8) if isinstance(fields.get(key), dict)), {})
    values = detail.get(1, 0)
    if not isinstance(values, int) or values < 0:
        raise _damaged("a page header declares a negative number of values")
    return _Page(uncompressed, compressed, values), reader.position


class _Truncated(Exception):
    """The bytes read so far end inside the struct."""


class _CompactReader:
    """Just enough of Thrift's compact protocol to read a struct's integer and struct fields
    (by field id) and skip every other field."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.position = 0

    def struct(self, depth: int = 0) -> dict[int, int | dict]:
        if depth > _MAX_NESTING:
            raise ValueError("structs nested too deep")
        fields: dict[int, int | dict] = {}
        field_id = 0
        while True:
            head = self._byte()
            kind = head & 0x0F
            if kind == _STOP:
                return fields
            delta = head >> 4
            field_id = field_id + delta if delta else self._zigzag()
            if kind in (_I16, _I32, _I64):
                fields[field_id] = self._zigzag()
            elif kind == _STRUCT:
                fields[field_id] = self.struct(depth + 1)
            else:
                self._skip(kind, depth)

    def _skip(self, kind: int, depth: int) -> None:
        skips: dict[int, Callable[[], object]] = {
            _TRUE: lambda: None,
            _FALSE: lambda: None,
            _BYTE: lambda: self._take(1),
            _I16: self._varint,
            _I32: self._varint,
            _I64: self._varint,
            _DOUBLE: lambda: self._take(8),
            _BINARY: lambda: self._take(self._varint()),
            _STRUCT: lambda: self.struct(depth + 1),
        }
        if kind in skips:
            skips[kind]()
        elif kind in (_LIST, _SET):
            head = self._byte()
            count = head >> 4 if head >> 4 != 15 else self._varint()
            for _ in range(count):
                self._skip_element(head & 0x0F, depth)
        elif kind == _MAP:
            count = self._varint()
            if count:
                types = self._byte()
                for _ in range(count):
                    self._skip_element(types >> 4, depth)
                    self._skip_element(types & 0x0F, depth)
        else:
            raise ValueError(f"unknown Thrift type {kind}")

    def _skip_element(self, kind: int, depth: int) -> None:
        if kind in (_TRUE, _FALSE):  # booleans in containers take a byte each
            self._take(1)
        else:
            self._skip(kind, depth + 1)

    def _byte(self) -> int:
        return self._take(1)[0]

    def _take(self, count: int) -> bytes:
        if self.position + count > len(self.data):
            raise _Truncated
        taken = self.data[self.position : self.position + count]
        self.position += count
        return taken

    def _varint(self) -> int:
        result = shift = 0
        while True:
            byte = self._byte()
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7
            if shift > 70:
                raise ValueError("a varint runs past 10 bytes")

    def _zigzag(self) -> int:
        value = self._varint()
        return (value >> 1) ^ -(value & 1)


def _damaged(why: str) -> DatasetFormatError:
    return DatasetFormatError(f"The Parquet file is damaged: {why}. Export it again and re-upload.")


def _expands_too_far(expanded: int, file_bytes: int, budget: int) -> DatasetFormatError:
    return DatasetFormatError(
        f"The Parquet file's {file_bytes:,} bytes expand to more than {expanded:,} as its pages "
        f"say, over our limit of {budget:,} for a file this size (at most "
        f"{MAX_COMPRESSION_RATIO}:1); split it into smaller files."
    )
