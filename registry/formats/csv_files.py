"""Read a CSV once, through the shared reader, to infer each column's type and profile it in
bounded memory; the dialect it decided is returned to be stored with the version.

Cells are typed a whole Arrow block at a time (pyarrow compute, RE2 with the same patterns as
`_classify`), never one Python string at a time; a block whose cells the vectorized path cannot
decide exactly as `_classify` would (an integer past int64, a date that does not exist) is
typed by `_classify` itself, so the schema and profile are those of a cell-by-cell reading.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from registry.formats.base import (
    PREVIEW_ROWS,
    DatasetFormatError,
    DatasetInspection,
    DatasetLimits,
    json_safe,
    preview_safe,
    too_many_rows,
)
from registry.formats.csv_reader import NULL_MARKERS, detect_csv_dialect, read_csv_blocks
from registry.formats.profiling import (
    COUNTED_VALUE_CHARS,
    NumericSummary,
    TopValues,
    distinct_capacity_for,
    sample_size_for,
)

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# Each pattern is written once and used both by `re` (one cell) and RE2 (a block); both read
# these the same way: ASCII classes, no backreferences.
_INTEGER_PATTERN = r"[+-]?[0-9]+"
_DECIMAL_PATTERN = r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity)"
_ISO_DATETIME_PATTERN = (
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"(?:[T ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,6})?)?(?:Z|[+-][0-9]{2}:?[0-9]{2})?)?"
)
_INTEGER = re.compile(_INTEGER_PATTERN, re.ASCII)
_DECIMAL = re.compile(_DECIMAL_PATTERN, re.ASCII | re.IGNORECASE)
_ISO_DATETIME = re.compile(_ISO_DATETIME_PATTERN, re.ASCII)
_NUMERIC = frozenset({"int64", "float64"})
_NULLS = pa.array(sorted(NULL_MARKERS), pa.string())
_BOOLS = pa.array(["false", "true"], pa.string())


def inspect_csv(
    path: Path, limits: DatasetLimits, progress: Callable[[float], None] | None = None
) -> DatasetInspection:
    dialect = detect_csv_dialect(path)
    size = max(path.stat().st_size, 1)
    columns: list[_Column] = []
    preview_records: list[tuple[str, ...]] = []
    row_count = 0
    for block in read_csv_blocks(path, dialect, max_columns=limits.max_columns):
        if not columns:
            columns = _columns(block.names)
        batch = block.batch
        row_count += batch.num_rows
        if row_count > limits.max_rows:
            raise too_many_rows(limits.max_rows)
        if len(preview_records) < PREVIEW_ROWS:
            wanted = PREVIEW_ROWS - len(preview_records)
            cells = [column.slice(0, wanted).to_pylist() for column in batch.columns]
            preview_records.extend(zip(*cells, strict=True))
        for column, cells in zip(columns, batch.columns, strict=True):
            column.add(cells)
        if progress is not None:
            progress(min(block.bytes_read / size, 1.0))
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


def _fullmatch(cells: pa.Array, pattern: str, *, ignore_case: bool = False) -> pa.Array:
    return pc.match_substring_regex(cells, f"^(?:{pattern})$", ignore_case=ignore_case)


class _Block:
    """One block of a column's present (stripped, non-null) cells, typed all at once: which
    kinds it holds, its numbers in row order as float64 (and as int64 when all are integers),
    and its earliest and latest times. `exact` is False when only `_classify` can type it."""

    def __init__(self, present: pa.Array) -> None:
        self.exact = True
        self.kinds: set[str] = set()
        self.numbers: pa.Array | None = None
        self.integers: pa.Array | None = None
        self.earliest: dt.datetime | None = None
        self.latest: dt.datetime | None = None
        boolean = pc.is_in(pc.utf8_lower(present), value_set=_BOOLS)
        integer = _fullmatch(present, _INTEGER_PATTERN)
        decimal = pc.and_not(_fullmatch(present, _DECIMAL_PATTERN, ignore_case=True), integer)
        numeric = pc.or_(integer, decimal)
        moment = pc.and_not(_fullmatch(present, _ISO_DATETIME_PATTERN), pc.or_(boolean, numeric))
        other = pc.invert(pc.or_(pc.or_(boolean, numeric), moment))
        counts = {
            "bool": boolean,
            "numeric": numeric,
            "datetime": moment,
            "string": other,
        }
        seen = {kind for kind, mask in counts.items() if pc.any(mask).as_py()}
        if "numeric" in seen:
            seen.discard("numeric")
            self._type_numbers(present, integer, decimal, numeric)
        if "datetime" in seen and self.exact:
            self._type_times(pc.filter(present, moment))
        self.kinds |= seen

    def _type_numbers(
        self, present: pa.Array, integer: pa.Array, decimal: pa.Array, numeric: pa.Array
    ) -> None:
        cells = pc.filter(present, numeric)
        try:
            # "+5" is an integer to Python's int(); Arrow's parser wants no sign for that.
            integers = pc.cast(
                pc.replace_substring_regex(pc.filter(present, integer), r"^\+", ""), pa.int64()
            )
        except pa.ArrowInvalid:  # past int64: Python makes those floats; let it decide
            self.exact = False
            return
        if len(integers):
            self.kinds.add("int64")
            if not pc.any(decimal).as_py():
                self.integers = integers
        if pc.any(decimal).as_py():
            self.kinds.add("float64")
        self.numbers = pc.cast(cells, pa.float64())

    def _type_times(self, cells: pa.Array) -> None:
        zoned = pc.and_(
            pc.greater(pc.utf8_length(cells), 10),
            pc.match_substring_regex(cells, r"(?:Z|[+-][0-9]{2}:?[0-9]{2})$"),
        )
        try:
            naive = pc.cast(pc.filter(cells, pc.invert(zoned)), pa.timestamp("us"))
            aware = pc.cast(pc.cast(pc.filter(cells, zoned), pa.timestamp("us", "UTC")), pa.int64())
        except pa.ArrowInvalid:  # a date that does not exist is text to Python; let it decide
            self.exact = False
            return
        moments = pa.chunked_array([pc.cast(naive, pa.int64()), aware], type=pa.int64()).cast(
            pa.timestamp("us")
        )
        extremes = pc.min_max(moments)
        self.earliest = extremes["min"].as_py()
        self.latest = extremes["max"].as_py()


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

    def add(self, cells: pa.Array) -> None:
        """Add one block of the column's cells, as the file's text."""
        stripped = pc.utf8_trim_whitespace(cells)
        null = pc.is_in(stripped, value_set=_NULLS)
        present = pc.filter(stripped, pc.invert(null))
        self.nulls += len(stripped) - len(present)
        self.count += len(present)
        if not len(present):
            return
        self._count_values(present)
        if self.dtype == "string":
            return
        block = _Block(present)
        if not block.exact:
            for value in present.to_pylist():
                self._add_one(value)
            return
        for kind in sorted(block.kinds):
            self.dtype = _widen(self.dtype, kind)
        if self.dtype in _NUMERIC:
            if self.numbers is None:
                self.numbers = NumericSummary(sample_size=self._sample_size, seed=self._seed)
            extremes = None
            if block.integers is not None:
                low_high = pc.min_max(block.integers)
                extremes = (low_high["min"].as_py(), low_high["max"].as_py())
            self.numbers.add_array(block.numbers.to_numpy(zero_copy_only=False), extremes)
        elif self.dtype == "datetime":
            self._widen_range(block.earliest, block.latest)
        elif self.dtype == "string":
            self.numbers = None
            self.earliest = self.latest = None

    def _count_values(self, present: pa.Array) -> None:
        """Count the block's values as adding them one by one in row order would: values
        already counted always are; new ones, in order of first appearance, while room is left.
        Only those ever reach Python, which keeps a column of unique values cheap."""
        longest = pc.max(pc.utf8_length(present)).as_py() or 0
        if longest > COUNTED_VALUE_CHARS:
            present = pc.utf8_slice_codeunits(present, 0, COUNTED_VALUE_CHARS)
        tally = pc.value_counts(present)
        values, counts = tally.field("values"), tally.field("counts")
        counted = self.values.counted()
        if counted:
            known = pc.is_in(values, value_set=pa.array(counted, pa.string()))
            for value, count in zip(
                pc.filter(values, known).to_pylist(),
                pc.filter(counts, known).to_pylist(),
                strict=True,
            ):
                self.values.add(value, count)
            unknown = pc.invert(known)
            values, counts = pc.filter(values, unknown), pc.filter(counts, unknown)
        room = self.values.capacity - len(counted)
        if len(values) > room:
            self.values.overflowed = True
        for value, count in zip(
            values.slice(0, room).to_pylist(), counts.slice(0, room).to_pylist(), strict=True
        ):
            self.values.add(value, count)

    def _add_one(self, value: str) -> None:
        """One cell the way a cell-by-cell reading types it (its value already counted)."""
        kind, parsed = _classify(value)
        if self.dtype == "string":
            return
        self.dtype = _widen(self.dtype, kind)
        if self.dtype in _NUMERIC:
            if self.numbers is None:
                self.numbers = NumericSummary(sample_size=self._sample_size, seed=self._seed)
            self.numbers.add(parsed)
        elif self.dtype == "datetime":
            self._widen_range(parsed, parsed)
        elif self.dtype == "string":
            self.numbers = None
            self.earliest = self.latest = None

    def _widen_range(self, earliest: dt.datetime | None, latest: dt.datetime | None) -> None:
        if earliest is not None:
            self.earliest = earliest if self.earliest is None else min(self.earliest, earliest)
        if latest is not None:
            self.latest = latest if self.latest is None else max(self.latest, latest)

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
