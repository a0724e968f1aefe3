"""Read a tabular dataset (CSV or Parquet) into typed columns of Python values: whole, for
recipes whose data fits in memory, or a chunk of rows at a time, for inference over data of any
size.

dtypes use the registry's schema names: "int64", "float64", "bool" and "string"; a missing cell
is None. Columns of other types (timestamps, lists, binary, ...) are listed in `ignored`.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
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
    first_row: int = 0  # a chunk's offset in the dataset: the rows before it


def read_table(path: Path, dataset_format: str) -> Table:
    if dataset_format == "csv":
        return _read_csv(path)
    if dataset_format == "parquet":
        return _read_parquet(path)
    raise RecipeInputError(f"Datasets in the {dataset_format!r} format cannot be read as a table.")


def read_table_chunks(path: Path, dataset_format: str, *, chunk_rows: int) -> Iterator[Table]:
    """The dataset as Tables of at most `chunk_rows` rows each, in order; at least one, so that
    an empty dataset still shows its columns. Memory holds one chunk, whatever the file's size.

    A chunk cannot see the whole column, so no type is guessed: CSV columns come as "string",
    each cell's text (None where missing), Parquet columns with their own types. `cast_column`
    reads a column as the type a recipe needs.
    """
    if dataset_format == "csv":
        return _csv_chunks(path, chunk_rows)
    if dataset_format == "parquet":
        return _parquet_chunks(path, chunk_rows)
    raise RecipeInputError(f"Datasets in the {dataset_format!r} format cannot be read as a table.")


def cast_column(column: Column, dtype: str, *, first_row: int = 0) -> Column:
    """`column` as `dtype`: text parsed, numbers and booleans widened to "float64", anything
    written as "string"; a value that does not fit is a RecipeInputError naming its row (rows
    count from 1 after the header; `first_row` is the chunk's offset) and the column."""
    if column.dtype == dtype:
        return column
    cast = _CASTS[dtype]
    values = []
    for row, value in enumerate(column.values, first_row + 1):
        try:
            values.append(None if value is None else cast(value))
        except (TypeError, ValueError):
            raise RecipeInputError(
                f"Row {row} of the dataset, column {column.name!r}: {value!r} is not "
                f"{_DTYPE_WORDS[dtype]}."
            ) from None
    return Column(column.name, dtype, values)


def _to_float(value: Any) -> float:
    if isinstance(value, str | int | float):  # bool is an int
        return float(value)
    raise TypeError(value)


def _to_int(value: Any) -> int:
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return int(value)
    raise TypeError(value)


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(value)


def _to_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


_CASTS: dict[str, Callable[[Any], Any]] = {
    "string": _to_text,
    "int64": _to_int,
    "float64": _to_float,
    "bool": _to_bool,
}
_DTYPE_WORDS = {
    "int64": "a whole number",
    "float64": "a number",
    "bool": "true or false",
    "string": "text",
}


def dataset_row_count(path: Path, dataset_format: str) -> int | None:
    """The number of rows where the format records it (Parquet); None where only reading the
    whole file would tell (CSV)."""
    if dataset_format != "parquet":
        return None
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise RecipeInputError(f"The Parquet file cannot be read: {exc}.") from exc


def _read_csv(path: Path) -> Table:
    records = _csv_records(path)
    _, header = next(records)
    cells: list[list[str]] = [[] for _ in header]
    for _, record in records:
        for column, raw in zip(cells, record, strict=True):
            column.append(raw)
    columns = [_typed_column(name, raw) for name, raw in zip(header, cells, strict=True)]
    return Table({column.name: column for column in columns}, row_count=len(cells[0]))


def _csv_records(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields): first the header's, with the names stripped, then each data
    record's, blank lines skipped; each record has as many fields as the header."""
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
            yield reader.line_num, header
            for record in reader:
                if not record:  # a blank line
                    continue
                if len(record) != len(header):
                    raise RecipeInputError(
                        f"Line {reader.line_num} of the CSV has {len(record)} fields but the "
                        f"header has {len(header)}."
                    )
                yield reader.line_num, record
        except csv.Error as exc:
            raise RecipeInputError(
                f"Line {reader.line_num} of the CSV cannot be parsed: {exc}."
            ) from exc
        except UnicodeDecodeError as exc:
            raise RecipeInputError("The CSV is not valid UTF-8.") from exc


def _csv_chunks(path: Path, chunk_rows: int) -> Iterator[Table]:
    records = _csv_records(path)
    _, header = next(records)
    cells: list[list[str | None]] = [[] for _ in header]
    first_row = 0
    for _, record in records:
        for column, raw in zip(cells, record, strict=True):
            raw = raw.strip()
            column.append(None if raw in NULL_MARKERS else raw)
        if len(cells[0]) == chunk_rows:
            yield _text_chunk(header, cells, first_row)
            first_row += chunk_rows
            cells = [[] for _ in header]
    if cells[0] or not first_row:
        yield _text_chunk(header, cells, first_row)


def _text_chunk(names: list[str], cells: list[list[str | None]], first_row: int) -> Table:
    columns = {
        name: Column(name, "string", values) for name, values in zip(names, cells, strict=True)
    }
    return Table(columns, row_count=len(cells[0]), first_row=first_row)


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


def _parquet_chunks(path: Path, chunk_rows: int) -> Iterator[Table]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        dtypes = {f.name: _parquet_dtype(f.type) for f in parquet.schema_arrow}
        ignored = {f.name: str(f.type) for f in parquet.schema_arrow if dtypes[f.name] is None}
        first_row = 0
        # A batch never spans row groups, so memory holds at most one row group's worth.
        for batch in parquet.iter_batches(batch_size=chunk_rows):
            columns = {
                name: Column(name, dtypes[name], array.to_pylist())
                for name, array in zip(batch.schema.names, batch.columns, strict=True)
                if dtypes[name] is not None
            }
            yield Table(columns, batch.num_rows, ignored, first_row)
            first_row += batch.num_rows
        if not first_row:
            empty = {name: Column(name, dtype, []) for name, dtype in dtypes.items() if dtype}
            yield Table(empty, 0, ignored)
    except (pa.ArrowException, OSError) as exc:
        raise RecipeInputError(f"The Parquet file cannot be read: {exc}.") from exc


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
