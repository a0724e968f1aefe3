"""Read a tabular dataset (CSV or Parquet) into typed columns of Python values: whole, for
recipes whose data fits in memory, or a chunk of rows at a time, for inference over data of any
size.

CSVs are read by the registry's own reader with the dialect it stored at upload (`csv_chunks`,
which every recipe uses), so a recipe sees exactly the rows and columns the registry profiled.
dtypes use the registry's schema names: "int64", "float64", "bool" and "string"; a missing cell
is None. Columns of other types (timestamps, lists, binary, ...) are listed in `ignored`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.recipes.base import RecipeInputError
from registry.formats.base import DatasetFormatError
from registry.formats.csv_reader import NULL_MARKERS, CsvChunk, CsvDialect, read_csv


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


def csv_chunks(
    path: Path, dialect: CsvDialect | None, *, chunk_rows: int | None = None
) -> Iterator[CsvChunk]:
    """The CSV's rows as the registry reads them (see registry.formats.csv_reader.read_csv),
    with its errors as RecipeInputError."""
    try:
        yield from read_csv(path, dialect, chunk_rows=chunk_rows)
    except DatasetFormatError as exc:
        raise RecipeInputError(exc.detail) from exc


def read_table(path: Path, dataset_format: str, *, csv_dialect: CsvDialect | None = None) -> Table:
    if dataset_format == "csv":
        return _read_csv(path, csv_dialect)
    if dataset_format == "parquet":
        return _read_parquet(path)
    raise RecipeInputError(f"Datasets in the {dataset_format!r} format cannot be read as a table.")


def read_table_chunks(
    path: Path, dataset_format: str, *, chunk_rows: int, csv_dialect: CsvDialect | None = None
) -> Iterator[Table]:
    """The dataset as Tables of at most `chunk_rows` rows each, in order; at least one, so that
    an empty dataset still shows its columns. Memory holds one chunk, whatever the file's size.

    A chunk cannot see the whole column, so no type is guessed: CSV columns come as "string",
    each cell's text (None where missing), Parquet columns with their own types. `cast_column`
    reads a column as the type a recipe needs.
    """
    if dataset_format == "csv":
        return _csv_chunks(path, csv_dialect, chunk_rows)
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


def _read_csv(path: Path, dialect: CsvDialect | None) -> Table:
    names: list[str] = []
    cells: list[list[str]] = []
    for chunk in csv_chunks(path, dialect):
        if not names:
            names, cells = chunk.names, [[] for _ in chunk.names]
        for column, more in zip(cells, chunk.columns, strict=True):
            column.extend(more)
    columns = [_typed_column(name, raw) for name, raw in zip(names, cells, strict=True)]
    return Table({column.name: column for column in columns}, row_count=len(cells[0]))


def _csv_chunks(path: Path, dialect: CsvDialect | None, chunk_rows: int) -> Iterator[Table]:
    for chunk in csv_chunks(path, dialect, chunk_rows=chunk_rows):
        columns = {
            name: Column(name, "string", [_present(raw) for raw in cells])
            for name, cells in zip(chunk.names, chunk.columns, strict=True)
        }
        yield Table(columns, row_count=chunk.row_count, first_row=chunk.first_row)


def _present(raw: str) -> str | None:
    """A cell's stripped text, or None where it is missing."""
    raw = raw.strip()
    return None if raw in NULL_MARKERS else raw


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
