"""Read a CSV once, row by row, to infer each column's type and profile it in bounded memory."""

from __future__ import annotations

import csv
import datetime as dt
import re
from collections.abc import Hashable, Iterator
from pathlib import Path
from typing import Any, TextIO

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
from registry.formats.sniffing import sniff_csv_dialect

NULL_MARKERS = frozenset({"", "NA", "N/A", "NaN", "nan", "null", "NULL", "None"})
# csv.reader pulls whole physical lines; a file with no line breaks would otherwise be read into
# memory in one piece.
MAX_LINE_CHARS = 4 * 1024 * 1024
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_INTEGER = re.compile(r"[+-]?\d+", re.ASCII)
_DECIMAL = re.compile(
    r"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf|infinity)", re.ASCII | re.IGNORECASE
)
_ISO_DATETIME = re.compile(
    r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?(?:Z|[+-]\d{2}:?\d{2})?)?",
    re.ASCII,
)
_NUMERIC = frozenset({"int64", "float64"})


def inspect_csv(path: Path, limits: DatasetLimits) -> DatasetInspection:
    dialect = sniff_csv_dialect(path)
    with path.open(encoding="utf-8-sig", newline="") as text:
        reader = csv.reader(_bounded_lines(text), dialect)
        try:
            columns = _read_header(reader, limits)
            preview_records, row_count = _read_rows(reader, columns, limits)
        except csv.Error as exc:
            raise DatasetFormatError(
                f"Line {reader.line_num} cannot be parsed as CSV ({exc}); "
                "check the quotes on that line or re-export the file."
            ) from exc
        except UnicodeDecodeError as exc:
            raise DatasetFormatError(
                f"The CSV is not valid UTF-8 after line {reader.line_num}; re-export it as UTF-8."
            ) from exc
    if row_count == 0:
        raise DatasetFormatError(
            "The CSV has a header but no data rows; upload a file with at least one row of data."
        )
    return DatasetInspection(
        format="csv",
        row_count=row_count,
        schema=[column.schema_entry() for column in columns],
        profile={column.name: column.profile() for column in columns},
        preview=[
            {
                column.name: column.preview_value(raw)
                for column, raw in zip(columns, record, strict=True)
            }
            for record in preview_records
        ],
    )


def _bounded_lines(text: TextIO) -> Iterator[str]:
    while line := text.readline(MAX_LINE_CHARS + 1):
        if len(line) > MAX_LINE_CHARS:
            raise DatasetFormatError(
                f"A line of the CSV is longer than {MAX_LINE_CHARS // 1024**2} MiB; check that "
                "the file has a line break after every row, or re-export it."
            )
        yield line


def _read_header(reader: Iterator[list[str]], limits: DatasetLimits) -> list[_Column]:
    header = [name.strip() for name in next(reader, [])]
    if not header:
        raise DatasetFormatError(
            "The first line of the CSV is blank; it must be a header row naming every column."
        )
    if len(header) > limits.max_columns:
        raise DatasetFormatError(
            f"The CSV has {len(header):,} columns; we accept at most {limits.max_columns:,}. "
            "Drop unused columns or split the file."
        )
    for position, name in enumerate(header, start=1):
        if not name:
            raise DatasetFormatError(
                f"Column {position} has no name in the header row; give every column a name."
            )
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise DatasetFormatError(
            f"The header names {duplicates[0]!r} more than once; give every column a unique name."
        )
    if all(_classify(name)[0] in _NUMERIC for name in header):
        raise DatasetFormatError(
            "The first row holds only numbers, so it looks like data rather than a header; "
            "add a header row with the column names."
        )
    sample_size = sample_size_for(len(header))
    distinct_capacity = distinct_capacity_for(len(header))
    return [
        _Column(name, seed=index, sample_size=sample_size, distinct_capacity=distinct_capacity)
        for index, name in enumerate(header)
    ]


def _read_rows(
    reader: Iterator[list[str]], columns: list[_Column], limits: DatasetLimits
) -> tuple[list[list[str]], int]:
    """Profile every data row; row numbers count the header as row 1, as a spreadsheet does."""
    preview_records: list[list[str]] = []
    row_count = 0
    for row_number, record in enumerate(reader, start=2):
        if not record:  # a blank line, which spreadsheets and pandas both skip
            continue
        if len(record) != len(columns):
            raise DatasetFormatError(
                f"Row {row_number} has {len(record)} columns but the header has "
                f"{len(columns)}; fix the row or re-export the file."
            )
        row_count += 1
        if row_count > limits.max_rows:
            raise too_many_rows(limits.max_rows)
        if row_count <= PREVIEW_ROWS:
            preview_records.append(record)
        for column, raw in zip(columns, record, strict=True):
            column.add(raw)
    return preview_records, row_count


def _classify(value: str) -> tuple[str, Any]:
    """The narrowest type a stripped, non-null cell fits, and the cell parsed as that type."""
    lowered = value.lower()
    if lowered in ("true", "false"):
        return "bool", lowered == "true"
    if _INTEGER.fullmatch(value):
        number = int(value)
        if _INT64_MIN <= number <= _INT64_MAX:
            return "int64", number
        return "float64", float(number)
    if _DECIMAL.fullmatch(value):
        return "float64", float(value)
    if _ISO_DATETIME.fullmatch(value):
        try:
            moment = dt.datetime.fromisoformat(value)
        except ValueError:
            return "string", value
        if moment.tzinfo is not None:  # compare aware and naive times on one UTC clock
            moment = moment.astimezone(dt.UTC).replace(tzinfo=None)
        return "datetime", moment
    return "string", value


def _widen(current: str | None, seen: str) -> str:
    """int64 widens to float64; any other disagreement widens to string."""
    if current is None or current == seen:
        return seen
    if current in _NUMERIC and seen in _NUMERIC:
        return "float64"
    return "string"


def _is_true(value: Hashable) -> bool:
    return str(value).lower() == "true"


class _Column:
    """What one pass has learned about a column: its widest type so far and its statistics."""

    def __init__(self, name: str, *, seed: int, sample_size: int, distinct_capacity: int):
        self.name = name
        self.dtype: str | None = None
        self.count = 0
        self.nulls = 0
        # Values are counted for every column: a numeric column can still widen to string on
        # its last row, and then its top values must already be known.
        self.values = TopValues(distinct_capacity)
        self.numbers: NumericSummary | None = None
        self.earliest: dt.datetime | None = None
        self.latest: dt.datetime | None = None
        self._seed = seed
        self._sample_size = sample_size

    def add(self, raw: str) -> None:
        value = raw.strip()
        if value in NULL_MARKERS:
            self.nulls += 1
            return
        self.count += 1
        self.values.add(value)
        if self.dtype == "string":
            return
        kind, parsed = _classify(value)
        self.dtype = _widen(self.dtype, kind)
        if self.dtype in _NUMERIC:
            if self.numbers is None:
                self.numbers = NumericSummary(sample_size=self._sample_size, seed=self._seed)
            self.numbers.add(parsed)
        elif self.dtype == "datetime":
            self.earliest = parsed if self.earliest is None else min(self.earliest, parsed)
            self.latest = parsed if self.latest is None else max(self.latest, parsed)
        elif self.dtype == "string":
            self.numbers = None
            self.earliest = self.latest = None

    def schema_entry(self) -> dict:
        return {"name": self.name, "dtype": self.dtype or "string", "nullable": self.nulls > 0}

    def profile(self) -> dict:
        if self.numbers is not None:
            return self.numbers.profile(nulls=self.nulls, integer=self.dtype == "int64")
        if self.dtype == "datetime":
            return {
                "count": self.count,
                "nulls": self.nulls,
                "min": json_safe(self.earliest),
                "max": json_safe(self.latest),
            }
        relabel = _is_true if self.dtype == "bool" else None
        return self.values.profile(count=self.count, nulls=self.nulls, relabel=relabel)

    def preview_value(self, raw: str) -> Any:
        value = raw.strip()
        if value in NULL_MARKERS:
            return None
        if self.dtype == "int64":
            return int(value)
        if self.dtype == "float64":
            return json_safe(float(value))
        if self.dtype == "bool":
            return _is_true(value)
        return raw
