"""Read a tabular dataset (CSV or Parquet) into typed columns of Python values, for recipes whose
data fits in memory.

dtypes use the registry's schema names: "int64", "float64", "bool" and "string"; a missing cell
is None. Columns of other types (timestamps, lists, binary, ...) are listed in `ignored`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.recipes.base import RecipeInputError

# The registry's null markers, so that a cell is missing here exactly when its profile said so.
NULL_MARKERS = frozenset({"", "NA", "N/A", "NaN", "nan", "null", "NULL", "None"})
CSV_DELIMITERS = ",;\t|"
_SNIFF_BYTES = 64 * 1024


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str
    values: list[Any]


@dataclass
class Table:
    columns: dict[str, Column]
    row_count: int
    ignored: dict[str, str] = field(default_factory=dict)  # name -> the type we cannot use


def read_table(path: Path, dataset_format: str) -> Table:
    if dataset_format == "csv":
        return _read_csv(path)
    if dataset_format == "parquet":
        return _read_parquet(path)
    raise RecipeInputError(f"Datasets in the {dataset_format!r} format cannot be read as a table.")


def _read_csv(path: Path) -> Table:
    with path.open(encoding="utf-8-sig", newline="") as text:
        try:
            sample = text.read(_SNIFF_BYTES)
            text.seek(0)
            reader = csv.reader(text, _sniff_dialect(sample))
            header = [name.strip() for name in next(reader, [])]
            if not header:
                raise RecipeInputError("The CSV is empty; it needs a header row and data rows.")
            if len(set(header)) != len(header):
                raise RecipeInputError("The CSV header names a column twice; rename one of them.")
            cells: list[list[str]] = [[] for _ in header]
            for record in reader:
                if not record:  # a blank line
                    continue
                if len(record) != len(header):
                    raise RecipeInputError(
                        f"Line {reader.line_num} of the CSV has {len(record)} fields but the "
                        f"header has {len(header)}."
                    )
                for column, raw in zip(cells, record, strict=True):
                    column.append(raw)
        except csv.Error as exc:
            raise RecipeInputError(
                f"Line {reader.line_num} of the CSV cannot be parsed: {exc}."
            ) from exc
        except UnicodeDecodeError as exc:
            raise RecipeInputError("The CSV is not valid UTF-8.") from exc
    columns = [_typed_column(name, raw) for name, raw in zip(header, cells, strict=True)]
    return Table({column.name: column for column in columns}, row_count=len(cells[0]))


def _sniff_dialect(sample: str) -> type[csv.Dialect]:
    """The delimiter the registry accepted the file with: the Sniffer on whole lines of the
    first 64 KiB, else the header's most frequent delimiter."""
    lines = sample.splitlines(keepends=True)
    if len(sample) >= _SNIFF_BYTES and len(lines) > 1:
        lines = lines[:-1]  # the last line was cut off
    try:
        return csv.Sniffer().sniff("".join(lines[:100]), delimiters=CSV_DELIMITERS)
    except csv.Error:
        header = lines[0] if lines else ""
        delimiter = max(CSV_DELIMITERS, key=header.count)
        return type("HeaderDialect", (csv.excel,), {"delimiter": delimiter})


def _typed_column(name: str, raw: list[str]) -> Column:
    """The narrowest of bool, int64, float64 and string that every present cell fits."""
    cells = [None if cell.strip() in NULL_MARKERS else cell.strip() for cell in raw]
    present = [cell for cell in cells if cell is not None]
    if not present:
        return Column(name, "string", cells)
    if all(cell.lower() in ("true", "false") for cell in present):
        return Column(name, "bool", [None if c is None else c.lower() == "true" for c in cells])
    for dtype, parse in (("int64", int), ("float64", float)):
        try:
            return Column(name, dtype, [None if c is None else parse(c) for c in cells])
        except ValueError:
            continue
    return Column(name, "string", cells)


def _read_parquet(path: Path) -> Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise RecipeInputError(f"The Parquet file cannot be read: {exc}.") from exc
    columns: dict[str, Column] = {}
    ignored: dict[str, str] = {}
    for arrow_field, array in zip(table.schema, table.columns, strict=True):
        dtype = _parquet_dtype(arrow_field.type)
        if dtype is None:
            ignored[arrow_field.name] = str(arrow_field.type)
        else:
            columns[arrow_field.name] = Column(arrow_field.name, dtype, array.to_pylist())
    return Table(columns, row_count=table.num_rows, ignored=ignored)


def _parquet_dtype(arrow_type: Any) -> str | None:
    import pyarrow as pa

    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    if pa.types.is_boolean(arrow_type):
        return "bool"
    if pa.types.is_integer(arrow_type):
        return "int64"
    if pa.types.is_floating(arrow_type):
        return "float64"
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "string"
    return None
