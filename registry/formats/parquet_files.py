"""Profile a Parquet file batch by batch from its Arrow schema, never loading it whole.

Nothing the uploader wrote is trusted for safety: the footer's claims are checked first (a file
that admits to being too large is refused at once), then every page header (what the decoder
really allocates and decodes, see parquet_pages), and while decoding, the rows, the bytes the
values really take and the largest single value are counted as they are read. Text and binary
columns are read as dictionaries, so a value repeated a million times is held once.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from registry.formats.base import (
    MAX_CELL_BYTES,
    PREVIEW_ROWS,
    DatasetFormatError,
    DatasetInspection,
    DatasetLimits,
    json_safe,
    preview_safe,
    too_many_rows,
)
from registry.formats.parquet_pages import check_pages
from registry.formats.profiling import (
    NumericSummary,
    TopValues,
    distinct_capacity_for,
    sample_size_for,
)

# About this many cells are decoded at a time, whatever the column count, and rows of about this
# many page bytes (as the page headers measure them) however wide the rows are.
_CELLS_PER_BATCH = 4_000_000
_BYTES_PER_BATCH = 64 * 1024 * 1024


def inspect_parquet(
    path: Path, limits: DatasetLimits, progress: Callable[[float], None] | None = None
) -> DatasetInspection:
    file_bytes = path.stat().st_size
    try:
        footer = pq.ParquetFile(path).metadata
        _check_metadata(footer, limits)
        with path.open("rb") as file:
            page_bytes = check_pages(file, footer, file_bytes=file_bytes, limits=limits)
        parquet = pq.ParquetFile(path, read_dictionary=_byte_array_paths(footer))
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(exc) from exc
    fields = list(parquet.schema_arrow)
    sample_size = sample_size_for(len(fields))
    distinct_capacity = distinct_capacity_for(len(fields))
    columns = [
        _Column(field, seed=index, sample_size=sample_size, distinct_capacity=distinct_capacity)
        for index, field in enumerate(fields)
    ]
    preview: list[dict] = []
    row_bytes = max(1, page_bytes // max(footer.num_rows, 1))
    batch_size = max(1, min(_CELLS_PER_BATCH // max(len(fields), 1), _BYTES_PER_BATCH // row_bytes))
    rows = decoded = 0
    try:
        for batch in parquet.iter_batches(batch_size=batch_size):
            rows += batch.num_rows
            if rows > limits.max_rows:
                raise too_many_rows(limits.max_rows)
            arrays = [_with_microseconds(array) for array in batch.columns]
            for column, array in zip(columns, arrays, strict=True):
                _check_largest_value(column.name, array)
                decoded += _decoded_bytes(array)
            if decoded > limits.max_uncompressed_bytes:
                raise DatasetFormatError(
                    f"The Parquet file's values take more than {decoded:,} bytes as they are "
                    f"read, over our limit of {limits.max_uncompressed_bytes:,}; split it into "
                    "smaller files."
                )
            if len(preview) < PREVIEW_ROWS:
                preview.extend(_preview_rows(columns, arrays, PREVIEW_ROWS - len(preview)))
            for column, array in zip(columns, arrays, strict=True):
                column.add(array)
            if progress is not None:
                progress(min(rows / max(footer.num_rows, 1), 1.0))
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(exc) from exc
    if rows != footer.num_rows:
        raise DatasetFormatError(
            f"The Parquet footer says the file holds {footer.num_rows:,} rows but it holds "
            f"{rows:,}, so it is damaged; export it again and re-upload."
        )
    return DatasetInspection(
        format="parquet",
        row_count=rows,
        schema=[column.schema_entry() for column in columns],
        profile={column.name: column.profile() for column in columns},
        preview=preview,
    )


def _byte_array_paths(metadata: pq.FileMetaData) -> list[str]:
    """Every text or binary leaf, nested ones included: these are read as dictionaries."""
    schema = metadata.schema
    return [
        schema.column(index).path
        for index in range(metadata.num_columns)
        if schema.column(index).physical_type == "BYTE_ARRAY"
    ]


def _check_metadata(metadata: pq.FileMetaData, limits: DatasetLimits) -> None:
    """Refuse on the footer's word alone, before a single value is decoded: a footer that
    claims too much is believed; one that claims too little is caught by the pages."""
    if metadata.num_rows == 0:
        raise DatasetFormatError("The Parquet file has no rows; upload a file that holds data.")
    if metadata.num_rows > limits.max_rows:
        raise too_many_rows(limits.max_rows)
    names = metadata.schema.to_arrow_schema().names
    if len(names) > limits.max_columns:
        raise DatasetFormatError(
            f"The Parquet file has {len(names):,} columns; we accept at most "
            f"{limits.max_columns:,}. Drop unused columns or split the file."
        )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DatasetFormatError(
            f"The Parquet file names the column {duplicates[0]!r} more than once; "
            "give every column a unique name."
        )
    uncompressed = sum(
        metadata.row_group(index).total_byte_size for index in range(metadata.num_row_groups)
    )
    if uncompressed > limits.max_uncompressed_bytes:
        raise DatasetFormatError(
            f"The Parquet file expands to {uncompressed:,} bytes, over our limit of "
            f"{limits.max_uncompressed_bytes:,}; split it into smaller files."
        )


def _unreadable(exc: Exception) -> DatasetFormatError:
    return DatasetFormatError(
        f"The file looks like Parquet but cannot be read ({exc}); export it again and re-upload."
    )


def _with_microseconds(array: pa.Array) -> pa.Array:
    """Python's datetime stops at microseconds; nanosecond times are truncated to fit it."""
    kind = array.type
    if pa.types.is_timestamp(kind) and kind.unit == "ns":
        return pc.cast(array, pa.timestamp("us", tz=kind.tz), safe=False)
    if pa.types.is_duration(kind) and kind.unit == "ns":
        return pc.cast(array, pa.duration("us"), safe=False)
    if pa.types.is_time64(kind) and kind.unit == "ns":
        return pc.cast(array, pa.time64("us"), safe=False)
    return array


def _preview_rows(columns: list[_Column], arrays: list[pa.Array], wanted: int) -> list[dict]:
    values = [array.slice(0, wanted).to_pylist() for array in arrays]
    return [
        {
            column.name: preview_safe(cells[row])
            for column, cells in zip(columns, values, strict=True)
        }
        for row in range(min(wanted, len(values[0]) if values else 0))
    ]


def _leaves(array: pa.Array) -> list[pa.Array]:
    """The arrays holding the values of `array`, through lists, maps and structs."""
    kind = array.type
    if (
        pa.types.is_list(kind)
        or pa.types.is_large_list(kind)
        or pa.types.is_fixed_size_list(kind)
        or pa.types.is_map(kind)
    ):
        return _leaves(array.flatten())
    if pa.types.is_struct(kind):
        return [leaf for child in array.flatten() for leaf in _leaves(child)]
    return [array]


def _value_lengths(array: pa.Array) -> pa.Array | None:
    """Each value's length in bytes for text and binary leaves (None for other types)."""
    if pa.types.is_dictionary(array.type):
        if not _is_binary_like(array.type.value_type):
            return None
        return pc.take(pc.binary_length(array.dictionary), array.indices)
    if _is_binary_like(array.type):
        return pc.binary_length(array)
    return None


def _is_binary_like(kind: pa.DataType) -> bool:
    return (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
        or pa.types.is_fixed_size_binary(kind)
    )


def _check_largest_value(name: str, array: pa.Array) -> None:
    for leaf in _leaves(array):
        lengths = _value_lengths(leaf)
        largest = None if lengths is None else pc.max(lengths).as_py()
        if largest is not None and largest > MAX_CELL_BYTES:
            raise DatasetFormatError(
                f"The column {name!r} holds a value of {largest:,} bytes; one value may hold at "
                f"most {MAX_CELL_BYTES:,}. Shorten or drop it, or store such values as files."
            )


def _decoded_bytes(array: pa.Array) -> int:
    """What the batch's values take once decoded: a dictionary's value counts once per row
    that refers to it, which is what a reader that decodes it would hold."""
    total = 0
    for leaf in _leaves(array):
        lengths = _value_lengths(leaf)
        if lengths is not None:
            total += (pc.sum(lengths).as_py() or 0) + 4 * len(leaf)
        else:
            total += leaf.nbytes
    return total


def _dtype(kind: pa.DataType) -> str:
    """Our small type vocabulary, shared with CSV: what a recipe needs to know about a column."""
    if pa.types.is_dictionary(kind):
        return _dtype(kind.value_type)
    checks = (
        ("bool", pa.types.is_boolean),
        ("int64", pa.types.is_integer),
        ("float64", lambda t: pa.types.is_floating(t) or pa.types.is_decimal(t)),
        ("string", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
        ("string", pa.types.is_null),
        ("datetime", lambda t: pa.types.is_timestamp(t) or pa.types.is_date(t)),
        ("binary", lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t)),
        ("binary", pa.types.is_fixed_size_binary),
        ("list", lambda t: pa.types.is_list(t) or pa.types.is_large_list(t)),
        ("list", pa.types.is_fixed_size_list),
        ("struct", pa.types.is_struct),
    )
    for name, matches in checks:
        if matches(kind):
            return name
    return "other"


class _Column:
    """Running statistics for one Parquet column, fed one Arrow array per batch."""

    def __init__(
        self, field: pa.Field, *, seed: int, sample_size: int, distinct_capacity: int
    ) -> None:
        self.name = field.name
        self.dtype = _dtype(field.type)
        self.count = 0
        self.nulls = 0
        self.numbers = (
            NumericSummary(sample_size=sample_size, seed=seed)
            if self.dtype in ("int64", "float64")
            else None
        )
        self.values = TopValues(distinct_capacity) if self.dtype in ("bool", "string") else None
        self.earliest: Any = None
        self.latest: Any = None

    def add(self, array: pa.Array) -> None:
        # Text and binary stay dictionaries (value_counts reads them as such, and a value
        # repeated on every row is held once); numbers and times decode to fixed-width values,
        # which the batch's rows bound.
        if pa.types.is_dictionary(array.type) and (
            self.numbers is not None or self.dtype == "datetime"
        ):
            array = array.dictionary_decode()
        self.nulls += array.null_count
        self.count += len(array) - array.null_count
        present = array.drop_null()
        if len(present) == 0:
            return
        if self.numbers is not None:
            self.numbers.add_array(
                pc.cast(present, pa.float64(), safe=False).to_numpy(zero_copy_only=False)
            )
        elif self.values is not None:
            for entry in pc.value_counts(present).to_pylist():
                self.values.add(entry["values"], entry["counts"])
        elif self.dtype == "datetime":
            extremes = pc.min_max(present)
            self._widen_range(_comparable(extremes["min"].as_py()))
            self._widen_range(_comparable(extremes["max"].as_py()))

    def _widen_range(self, moment: Any) -> None:
        self.earliest = moment if self.earliest is None else min(self.earliest, moment)
        self.latest = moment if self.latest is None else max(self.latest, moment)

    def schema_entry(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "nullable": self.nulls > 0}

    def profile(self) -> dict:
        if self.numbers is not None:
            return self.numbers.profile(nulls=self.nulls, integer=self.dtype == "int64")
        if self.values is not None:
            return self.values.profile(count=self.count, nulls=self.nulls)
        if self.dtype == "datetime":
            return {
                "count": self.count,
                "nulls": self.nulls,
                "min": json_safe(self.earliest),
                "max": json_safe(self.latest),
            }
        return {"count": self.count, "nulls": self.nulls}


def _comparable(moment: Any) -> Any:
    """Aware timestamps become naive UTC, as in CSV, so the profile reads the same for both."""
    if isinstance(moment, dt.datetime) and moment.tzinfo is not None:
        return moment.astimezone(dt.UTC).replace(tzinfo=None)
    return moment
