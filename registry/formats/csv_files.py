"""Read a CSV once, through the shared reader, to infer each column's type and profile it in
bounded memory; the dialect it decided is returned to be stored with the version."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any

from registry.formats.base import (
    PREVIEW_ROWS,
    DatasetFormatError,
    DatasetInspection,
    DatasetLimits,
    json_safe,
    preview_safe,
    too_many_rows,
)
from registry.formats.csv_reader import NULL_MARKERS, detect_csv_dialect, read_csv
from registry.formats.profiling import (
    NumericSummary,
    TopValues,
    distinct_capacity_for,
    sample_size_for,
)

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
    dialect = detect_csv_dialect(path)
    columns: list[_Column] = []
    preview_records: list[tuple[str, ...]] = []
    row_count = 0
    for chunk in read_csv(path, dialect, max_columns=limits.max_columns):
        if not columns:
            columns = _columns(chunk.names)
        row_count += chunk.row_count
        if row_count > limits.max_rows:
            raise too_many_rows(limits.max_rows)
        if len(preview_records) < PREVIEW_ROWS:
            wanted = PREVIEW_ROWS - len(preview_records)
            preview_records.extend(zip(*(cells[:wanted] for cells in chunk.columns), strict=True))
        for column, cells in zip(columns, chunk.columns, strict=True):
            for raw in cells:
                column.add(raw)
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
        csv_dialect=dialect.as_json(),
    )


def _columns(header: list[str]) -> list[_Column]:
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
        return preview_safe(raw)
