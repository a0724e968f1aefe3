"""The one CSV reader. The registry decides a file's dialect when it is uploaded
(`detect_csv_dialect`) and stores it on the dataset version (`DatasetVersion.csv_dialect`); the
profile, and every recipe that trains or predicts on the version, read the file through
`read_csv` with that stored dialect (the worker passes it to the job's child in spec.json), so
all of them see the same rows, columns and cells.

Parsing is pyarrow's CSV reader, serial and streaming: memory holds one block of BLOCK_BYTES,
and a row longer than that is refused. Cells come as the file's text, never typed here: each
reader types them its own way, from the same strings; a cell is missing exactly when its
stripped text is one of NULL_MARKERS. The first record is the header (the registry accepts no
file without one); blank lines are skipped.

No Django and no pyarrow at import: the job's child imports this module, and the web process
imports pyarrow only when a CSV arrives.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from registry.formats.base import MAX_CELL_BYTES, DatasetFormatError, not_a_dataset

CSV_DELIMITERS = ",;\t|"
CSV_SNIFF_BYTES = 64 * 1024
# The Sniffer's cost grows with lines times characters; a hundred rows settle the delimiter.
CSV_SNIFF_LINES = 100
NULL_MARKERS = frozenset({"", "NA", "N/A", "NaN", "nan", "null", "NULL", "None"})
# Memory holds about a block; pyarrow refuses a row that straddles more than two, and no cell
# may hold more than MAX_CELL_BYTES.
BLOCK_BYTES = 2 * MAX_CELL_BYTES
# Text files never hold these; binary files almost always do within 64 KiB.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_ENCODINGS = {"utf-8": "utf8"}  # ours -> pyarrow's name; a byte order mark is skipped
# Blocks the parser may read beyond those already handed out: it needs the next one to finish a
# row that straddles two, and one more to keep the disk busy while a block is worked on.
READ_AHEAD_BLOCKS = 2


@dataclass(frozen=True)
class CsvDialect:
    """How a CSV is split into rows and cells. Stored as JSON on the dataset version."""

    delimiter: str = ","
    quote_char: str = '"'
    double_quote: bool = True
    encoding: str = "utf-8"

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CsvDialect:
        """The dialect a version stored; ValueError for anything this reader cannot apply."""
        unknown = set(data) - {field.name for field in fields(cls)}
        if unknown:
            raise ValueError(f"unknown CSV dialect keys {sorted(unknown)}")
        dialect = cls(**data)
        if dialect.delimiter not in CSV_DELIMITERS or len(dialect.delimiter) != 1:
            raise ValueError(f"unknown CSV delimiter {dialect.delimiter!r}")
        if dialect.quote_char != '"' or not isinstance(dialect.double_quote, bool):
            raise ValueError("the CSV quoting must be standard double quotes")
        if dialect.encoding not in _ENCODINGS:
            raise ValueError(f"unknown CSV encoding {dialect.encoding!r}")
        return dialect


@dataclass(frozen=True)
class CsvChunk:
    """Consecutive data rows: `columns[i]` holds column `names[i]`'s cells, as text.
    `first_row` is the number of data rows before the chunk."""

    names: list[str]
    columns: list[list[str]]
    first_row: int

    @property
    def row_count(self) -> int:
        return len(self.columns[0]) if self.columns else 0


def detect_csv_dialect(path: Path) -> CsvDialect:
    """The dialect of the UTF-8 text (a byte order mark is allowed) in `path`, decided from its
    first 64 KiB: the Sniffer's delimiter, else the header's most frequent one. Only the
    delimiter is sniffed: the Sniffer's quoting guesses turn off the standard "" escape on
    cells that hold quotes and delimiters, common in text data."""
    with path.open("rb") as file:
        head = file.read(CSV_SNIFF_BYTES + 1)
    complete = len(head) <= CSV_SNIFF_BYTES
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    try:
        text = decoder.decode(head[:CSV_SNIFF_BYTES], final=complete)
    except UnicodeDecodeError as exc:
        raise not_a_dataset() from exc
    if _CONTROL_CHARACTERS.search(text):
        raise not_a_dataset()
    if not complete:  # the sample ends mid-line; the Sniffer should see whole rows only
        text = text[: text.rfind("\n") + 1] or text
    if not text.strip():
        raise DatasetFormatError(
            "The file is empty; upload a CSV with a header row and at least one data row."
        )
    sample = "".join(text.splitlines(keepends=True)[:CSV_SNIFF_LINES])
    try:
        return CsvDialect(delimiter=csv.Sniffer().sniff(sample, CSV_DELIMITERS).delimiter)
    except csv.Error:
        return _dialect_from_header(text.splitlines()[0])


def _dialect_from_header(header: str) -> CsvDialect:
    """The Sniffer gives up when rows disagree; the header's most frequent delimiter then wins,
    so that reading the rows can report exactly which row is wrong."""
    counts = {delimiter: header.count(delimiter) for delimiter in CSV_DELIMITERS}
    delimiter = max(counts, key=counts.__getitem__)
    return CsvDialect(delimiter=delimiter if counts[delimiter] else ",")


def read_csv(
    path: Path,
    dialect: CsvDialect | None = None,
    *,
    chunk_rows: int | None = None,
    max_columns: int | None = None,
) -> Iterator[CsvChunk]:
    """The file's data rows in chunks of `chunk_rows` (the last one shorter), or as parsed
    (about a block at a time) without it; always at least one chunk, so the header is known.

    `dialect` is the one stored at upload; None (a version recorded before dialects were
    stored) detects it exactly as the upload did. Raises what `read_csv_blocks` raises.
    """
    pending: list[list[str]] = []
    first_row = 0
    names: list[str] = []
    for block in read_csv_blocks(path, dialect, max_columns=max_columns):
        names = block.names
        batch = block.batch
        if not pending:
            pending = [[] for _ in names]
        if chunk_rows is None:
            if batch.num_rows or not first_row:
                cells = [column.to_pylist() for column in batch.columns]
                yield CsvChunk(names, cells, first_row)
            first_row += batch.num_rows
            continue
        # Only a chunk's rows become Python strings at a time; the block stays in Arrow.
        offset = 0
        while offset < batch.num_rows:
            take = min(chunk_rows - len(pending[0]), batch.num_rows - offset)
            piece = batch.slice(offset, take)
            for column, more in zip(pending, piece.columns, strict=True):
                column.extend(more.to_pylist())
            offset += take
            if len(pending[0]) == chunk_rows:
                yield CsvChunk(names, pending, first_row)
                pending = [[] for _ in names]
                first_row += chunk_rows
    if chunk_rows is not None and (pending[0] or not first_row):
        yield CsvChunk(names, pending, first_row)


@dataclass(frozen=True)
class CsvBlock:
    """One parsed block: `batch` holds column `names[i]`'s cells as Arrow strings in column i.
    `first_row` is the number of data rows before it; `bytes_read` how far into the file the
    reader is (it reads a little ahead), for progress."""

    names: list[str]
    batch: Any
    first_row: int
    bytes_read: int


def read_csv_blocks(
    path: Path, dialect: CsvDialect | None = None, *, max_columns: int | None = None
) -> Iterator[CsvBlock]:
    """The file's data rows as Arrow record batches of about BLOCK_BYTES, never as Python
    objects, for readers that work on whole columns; always at least one block (empty for a
    header alone), so the header is known.

    Raises DatasetFormatError, naming the row where it can, for a header that does not name
    every column once, a row with a different number of cells, a cell over MAX_CELL_BYTES, a
    row longer than BLOCK_BYTES (or a quote never closed), and text that is not in the
    dialect's encoding.
    """
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    dialect = dialect or detect_csv_dialect(path)
    refused: list[Any] = []

    def refuse_row(row: Any) -> str:
        refused.append(row)
        return "error"

    parse = pa_csv.ParseOptions(
        delimiter=dialect.delimiter,
        quote_char=dialect.quote_char,
        double_quote=dialect.double_quote,
        escape_char=False,
        newlines_in_values=True,
        ignore_empty_lines=True,
        invalid_row_handler=refuse_row,
    )
    read = pa_csv.ReadOptions(
        use_threads=False, block_size=BLOCK_BYTES, encoding=_ENCODINGS[dialect.encoding]
    )
    rows = 0
    try:
        with _paced_csv(path, read_options=read, parse_options=parse) as (first_block, _):
            raw_names = first_block.schema.names
        names = _checked_header(raw_names, max_columns)
        convert = pa_csv.ConvertOptions(
            column_types=dict.fromkeys(raw_names, pa.string()),
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        )
        yielded = False
        with _paced_csv(path, read_options=read, parse_options=parse, convert_options=convert) as (
            reader,
            source,
        ):
            for batch in reader:
                source.handed_out()
                _check_cell_sizes(batch, names, rows)
                yield CsvBlock(names, batch, rows, source.position)
                yielded = True
                rows += batch.num_rows
            if not yielded:
                empty = pa.RecordBatch.from_pylist([], schema=reader.schema)
                yield CsvBlock(names, empty, 0, source.position)
    except pa.ArrowInvalid as exc:
        raise _parse_error(path, exc, refused, rows) from exc


class _PacedFile:
    """The file as pyarrow's streaming CSV reader reads it, a block per `read`, but never more
    than READ_AHEAD_BLOCKS past the blocks handed out (`handed_out`).

    The reader reads on a background thread that would otherwise run up to 32 blocks (256 MiB)
    ahead of a consumer slower than the disk. `release` lets it run free, so that a reader
    closed early (an error, a consumer that stopped) is never left waiting.
    """

    def __init__(self, path: Path) -> None:
        self._file = path.open("rb")
        self._turn = threading.Condition()
        self._reads = 0
        self._handed_out = 0
        self._released = False
        self.position = 0
        self.closed = False

    def read_buffer(self, size: int) -> Any:
        """The next `size` bytes, read straight into an Arrow buffer: no Python bytes object,
        so a block costs its memory once, in Arrow's pool."""
        import pyarrow as pa

        with self._turn:
            self._turn.wait_for(
                lambda: self._released or self._reads <= self._handed_out + READ_AHEAD_BLOCKS
            )
            self._reads += 1
        buffer = pa.allocate_buffer(size, resizable=True)
        read = self._file.readinto(memoryview(buffer)) or 0
        buffer.resize(read)
        self.position += read
        return buffer

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = max(self._file.seek(0, 2) - self.position, 0)
            self._file.seek(self.position)
        return self.read_buffer(size).to_pybytes()

    def handed_out(self) -> None:
        with self._turn:
            self._handed_out += 1
            self._turn.notify_all()

    def release(self) -> None:
        with self._turn:
            self._released = True
            self._turn.notify_all()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.position

    def close(self) -> None:
        self.closed = True
        self._file.close()


@contextlib.contextmanager
def _paced_csv(path: Path, **options: Any) -> Iterator[tuple[Any, _PacedFile]]:
    """pyarrow's streaming CSV reader over a _PacedFile, and that file."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    source = _PacedFile(path)
    try:
        reader = pa_csv.open_csv(pa.PythonFile(source, mode="r"), **options)
        try:
            yield reader, source
        finally:
            source.release()
            reader.close()
    finally:
        source.release()
        source.close()


def _check_cell_sizes(batch: Any, names: list[str], rows_before: int) -> None:
    import pyarrow.compute as pc

    for name, column in zip(names, batch.columns, strict=True):
        lengths = pc.binary_length(column)
        if (pc.max(lengths).as_py() or 0) <= MAX_CELL_BYTES:
            continue
        index = pc.indices_nonzero(pc.greater(lengths, MAX_CELL_BYTES))[0].as_py()
        raise DatasetFormatError(
            f"Row {rows_before + index + 2} of the CSV has a value of "
            f"{lengths[index].as_py():,} bytes in column {name!r}; one value may hold at most "
            f"{MAX_CELL_BYTES:,}. Shorten it, or store such values as files."
        )


def _checked_header(raw_names: list[str], max_columns: int | None) -> list[str]:
    names = [name.strip() for name in raw_names]
    if not any(names):
        raise DatasetFormatError(
            "The first line of the CSV is blank; it must be a header row naming every column."
        )
    if max_columns is not None and len(names) > max_columns:
        raise DatasetFormatError(
            f"The CSV has {len(names):,} columns; we accept at most {max_columns:,}. "
            "Drop unused columns or split the file."
        )
    for position, name in enumerate(names, start=1):
        if not name:
            raise DatasetFormatError(
                f"Column {position} has no name in the header row; give every column a name."
            )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DatasetFormatError(
            f"The header names {duplicates[0]!r} more than once; give every column a unique name."
        )
    return names


def _parse_error(path: Path, exc: Exception, refused: list[Any], rows: int) -> DatasetFormatError:
    """pyarrow's error in a tenant's words; rows count the header as row 1, as a spreadsheet
    does. `rows` is the data rows parsed before the failing block."""
    message = str(exc)
    if refused:
        row = refused[0]
        where = f"Row {row.number}" if row.number is not None else "A row"
        return DatasetFormatError(
            f"{where} has {row.actual_columns} columns but the header has "
            f"{row.expected_columns}; fix the row or re-export the file."
        )
    if "straddl" in message:
        return DatasetFormatError(
            f"A row after row {rows + 1} of the CSV is longer than "
            f"{BLOCK_BYTES // 1024**2} MiB, or opens a quote that is never closed; check that "
            "row's quotes, or that every row ends with a line break, or re-export the file."
        )
    if "UTF8" in message or "UTF-8" in message:
        return DatasetFormatError(
            f"The CSV is not valid UTF-8 on line {_first_invalid_utf8_line(path)}; re-export it "
            "as UTF-8."
        )
    if "Empty CSV" in message:
        return DatasetFormatError(
            "The file is empty; upload a CSV with a header row and at least one data row."
        )
    return DatasetFormatError(
        f"The CSV cannot be parsed after row {rows + 1} ({message}); check the quotes there or "
        "re-export the file."
    )


def _first_invalid_utf8_line(path: Path) -> int:
    """The line (from 1) of the first byte that is not UTF-8: pyarrow names only the column."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    lines = 1
    with path.open("rb") as file:
        while block := file.read(1024 * 1024):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                return lines + block.count(b"\n", 0, max(exc.start, 0))
            lines += block.count(b"\n")
    return lines
