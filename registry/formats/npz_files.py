"""Check a NumPy .npz archive from its .npy headers, then profile each array in chunks.

Nothing is unpickled: every header is read with `numpy.lib.format` (which parses it as a
literal, not as code), object arrays are refused, and the data is decoded with `frombuffer`.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.lib import format as npy_format

from registry.formats.archives import (
    ExpansionMeter,
    check_declared_expansion,
    check_entry,
    open_checked_zip,
)
from registry.formats.base import (
    PREVIEW_ROWS,
    DatasetFormatError,
    DatasetInspection,
    DatasetLimits,
    json_safe,
    too_many_rows,
)
from registry.formats.profiling import (
    NumericSummary,
    TopValues,
    distinct_capacity_for,
    sample_size_for,
)

# Booleans, integers, floats, complex numbers, text, bytes, datetimes and durations.
_ALLOWED_KINDS = "biufcUSMm"
_NUMERIC_KINDS = "biuf"
_CHUNK_BYTES = 8 * 1024 * 1024
# A row with more elements than this (an image, say) is previewed as its type and shape.
_PREVIEW_ELEMENTS = 32


@dataclass(frozen=True)
class _ArrayHeader:
    info: zipfile.ZipInfo
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    data_offset: int

    @property
    def data_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def row_size(self) -> int:
        return math.prod(self.shape[1:])


def inspect_npz(path: Path, limits: DatasetLimits) -> DatasetInspection:
    archive_bytes = path.stat().st_size
    meter = ExpansionMeter(archive_bytes=archive_bytes, limits=limits)
    with open_checked_zip(path, limits=limits) as archive:
        infos = [info for info in archive.infolist() if not info.is_dir()]
        for info in infos:
            check_entry(info)
        check_declared_expansion(infos, archive_bytes=archive_bytes, limits=limits)
        headers = [_read_header(archive, info, meter) for info in infos]
        row_count = _check_arrays(headers, limits)
        sample_size = sample_size_for(len(headers))
        distinct_capacity = distinct_capacity_for(len(headers))
        schema, profile, previews = [], {}, {}
        for seed, header in enumerate(headers):
            column = _ArrayProfile(header, sample_size, distinct_capacity, seed)
            _stream_array(archive, header, column, meter)
            schema.append(column.schema_entry())
            profile[header.name] = column.profile()
            rows = column.preview
            if rows is not None:
                previews[header.name] = rows
    preview = [
        {name: values[row] for name, values in previews.items()}
        for row in range(min(PREVIEW_ROWS, row_count))
    ]
    return DatasetInspection(
        format="npz", row_count=row_count, schema=schema, profile=profile, preview=preview
    )


def _read_header(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, meter: ExpansionMeter
) -> _ArrayHeader:
    name = info.filename.removesuffix(".npy")
    with meter.reading(archive, info) as entry:
        try:
            version = npy_format.read_magic(entry)
            if version == (1, 0):
                shape, fortran_order, dtype = npy_format.read_array_header_1_0(entry)
            elif version == (2, 0):
                shape, fortran_order, dtype = npy_format.read_array_header_2_0(entry)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            if any(size < 0 for size in shape):
                raise ValueError(f"negative shape {shape}")
        except ValueError as exc:
            raise DatasetFormatError(
                f"The array {name!r} has a damaged .npy header ({exc}); "
                "save the arrays again with numpy.savez."
            ) from exc
        header = _ArrayHeader(info, name, dtype, tuple(shape), fortran_order, entry.tell())
    _check_dtype(header)
    if info.file_size != header.data_offset + header.data_bytes:
        raise DatasetFormatError(
            f"The array {name!r} declares shape {list(header.shape)} of {dtype} but its entry "
            "holds a different number of bytes, so it is truncated or damaged; "
            "save the arrays again with numpy.savez."
        )
    return header


def _check_dtype(header: _ArrayHeader) -> None:
    if header.dtype.hasobject:
        raise DatasetFormatError(
            f"The array {header.name!r} holds Python objects, which we never unpickle; "
            "save numeric arrays only."
        )
    if not 0 < header.dtype.itemsize <= _CHUNK_BYTES:
        raise DatasetFormatError(
            f"The array {header.name!r} has elements of {header.dtype.itemsize:,} bytes each; "
            "save numbers or short strings, one value per element."
        )
    if header.dtype.names is not None or header.dtype.kind not in _ALLOWED_KINDS:
        raise DatasetFormatError(
            f"The array {header.name!r} has the unsupported type {header.dtype}; "
            "save plain numeric, boolean, text or datetime arrays (one per field)."
        )


def _check_arrays(headers: list[_ArrayHeader], limits: DatasetLimits) -> int:
    """Check counts and shapes from the headers alone and return the shared row count (sizes:
    each header matches its entry's, which `check_declared_expansion` has bounded)."""
    if not headers:
        raise DatasetFormatError("The .npz archive holds no arrays; save at least one array.")
    if len(headers) > limits.max_columns:
        raise DatasetFormatError(
            f"The .npz archive holds {len(headers):,} arrays; we accept at most "
            f"{limits.max_columns:,}. Combine or drop arrays."
        )
    with_rows = [header for header in headers if header.shape]
    if not with_rows:
        raise DatasetFormatError(
            "The .npz archive holds only scalars; save arrays with one entry per sample."
        )
    first = with_rows[0]
    for header in with_rows[1:]:
        if header.shape[0] != first.shape[0]:
            raise DatasetFormatError(
                f"The array {header.name!r} has {header.shape[0]:,} rows but {first.name!r} has "
                f"{first.shape[0]:,}; every array must have one entry per sample."
            )
    row_count = first.shape[0]
    if row_count == 0:
        raise DatasetFormatError("The arrays in the .npz archive have no rows; save some data.")
    if row_count > limits.max_rows:
        raise too_many_rows(limits.max_rows)
    return row_count


def _stream_array(
    archive: zipfile.ZipFile, header: _ArrayHeader, column: _ArrayProfile, meter: ExpansionMeter
) -> None:
    """Decode the array's data in flat chunks of about 8 MiB, in the order it is stored."""
    total = math.prod(header.shape)
    chunk_elements = max(1, _CHUNK_BYTES // max(header.dtype.itemsize, 1))
    with meter.reading(archive, header.info) as entry:
        entry.read(header.data_offset)
        for start in range(0, total, chunk_elements):
            count = min(chunk_elements, total - start)
            chunk = _read_elements(entry, header, count)
            column.add(chunk, start)


def _read_elements(entry: IO[bytes], header: _ArrayHeader, count: int) -> np.ndarray:
    data = entry.read(count * header.dtype.itemsize)
    if len(data) != count * header.dtype.itemsize:
        raise DatasetFormatError(
            f"The array {header.name!r} ends early, so it is damaged; save the arrays again."
        )
    return np.frombuffer(data, dtype=header.dtype)


class _ArrayProfile:
    """Statistics over every element of one array, plus the first rows for the preview."""

    def __init__(
        self, header: _ArrayHeader, sample_size: int, distinct_capacity: int, seed: int
    ) -> None:
        self.header = header
        kind = header.dtype.kind
        self.numbers = (
            NumericSummary(sample_size=sample_size, seed=seed) if kind in _NUMERIC_KINDS else None
        )
        self.values = TopValues(distinct_capacity) if kind in "US" else None
        self.count = 0
        self.nulls = 0
        self.earliest: np.generic | None = None
        self.latest: np.generic | None = None
        self._preview_rows = min(PREVIEW_ROWS, header.shape[0]) if header.shape else 0
        self._collect = bool(header.shape) and header.row_size <= _PREVIEW_ELEMENTS
        preview_shape = (self._preview_rows, header.row_size if self._collect else 0)
        self._first_rows = np.zeros(preview_shape, dtype=header.dtype)

    def add(self, chunk: np.ndarray, start: int) -> None:
        self.count += chunk.size
        if self._collect:
            self._take_first_rows(chunk, start)
        if self.numbers is not None:
            self.numbers.add_array(chunk)
        elif self.values is not None:
            for value, value_count in zip(*np.unique(chunk, return_counts=True), strict=True):
                item = value.item()
                if isinstance(item, bytes):
                    item = item.decode("utf-8", "replace")
                self.values.add(item, int(value_count))
        elif self.header.dtype.kind in "Mm":
            present = chunk[~np.isnat(chunk)]
            self.nulls += chunk.size - present.size
            if present.size:
                low, high = present.min(), present.max()
                self.earliest = low if self.earliest is None else min(self.earliest, low)
                self.latest = high if self.latest is None else max(self.latest, high)

    def _take_first_rows(self, chunk: np.ndarray, start: int) -> None:
        """Copy the elements of the first rows that fall in this chunk.

        In C order row i, element p sits at i * row_size + p; in Fortran order at i + rows * p,
        so the first rows of a Fortran array are spread over the whole stream.
        """
        rows, row_size = self._first_rows.shape
        if self.header.fortran_order:
            for element in range(row_size):
                span_start = element * self.header.shape[0]
                low, high = max(span_start, start), min(span_start + rows, start + chunk.size)
                if low < high:
                    target = self._first_rows[low - span_start : high - span_start, element]
                    target[:] = chunk[low - start : high - start]
        else:
            flat = self._first_rows.reshape(-1)
            low, high = start, min(flat.size, start + chunk.size)
            if low < high:
                flat[low:high] = chunk[: high - low]

    def schema_entry(self) -> dict:
        return {
            "name": self.header.name,
            "dtype": _dtype_name(self.header.dtype),
            "shape": list(self.header.shape),
            "nullable": self.nulls > 0,
        }

    def profile(self) -> dict:
        if self.numbers is not None:
            return self.numbers.profile(nulls=0, integer=self.header.dtype.kind in "iu")
        if self.values is not None:
            return self.values.profile(count=self.count, nulls=0)
        if self.header.dtype.kind in "Mm":
            return {
                "count": self.count,
                "nulls": self.nulls,
                "min": None if self.earliest is None else str(self.earliest),
                "max": None if self.latest is None else str(self.latest),
            }
        return {"count": self.count, "nulls": 0}

    @property
    def preview(self) -> list[Any] | None:
        """One JSON value per preview row, or None for scalars (they have no rows)."""
        header = self.header
        if not header.shape:
            return None
        if not self._collect:
            shape = "x".join(str(size) for size in header.shape[1:])
            return [f"<{header.dtype.name} array {shape}>"] * self._preview_rows
        order = "F" if header.fortran_order else "C"
        return [
            json_safe(row.reshape(header.shape[1:], order=order).tolist())
            for row in self._first_rows
        ]


def _dtype_name(dtype: np.dtype) -> str:
    """NumPy's own name for numbers (a recipe needs float32 vs uint8); our words for the rest."""
    return {"U": "string", "S": "binary", "M": "datetime", "m": "duration"}.get(
        dtype.kind, dtype.name
    )
