"""Decide a dataset's format from its bytes, never from the name the uploader gave it."""

from __future__ import annotations

import codecs
import csv
import re
import zipfile
from pathlib import Path

from registry.formats.archives import check_entry, open_checked_zip, reading_entry
from registry.formats.base import DEFAULT_LIMITS, DatasetFormatError, DatasetLimits

PARQUET_MAGIC = b"PAR1"
# A zip starts with a local file header, or with the end record when it holds nothing.
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
NPY_MAGIC = b"\x93NUMPY"
CSV_SNIFF_BYTES = 64 * 1024
# The Sniffer's cost grows with lines times characters; a hundred rows settle the delimiter.
CSV_SNIFF_LINES = 100
CSV_DELIMITERS = ",;\t|"
# Text files never hold these; binary files almost always do within 64 KiB.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def sniff_format(path: Path, *, limits: DatasetLimits = DEFAULT_LIMITS) -> str:
    """Return "csv", "parquet", "npz" or "image_folder_zip", or raise DatasetFormatError."""
    with path.open("rb") as file:
        head = file.read(len(PARQUET_MAGIC))
        if head == PARQUET_MAGIC:
            file.seek(0, 2)
            size = file.tell()
            file.seek(max(size - len(PARQUET_MAGIC), 0))
            if size >= 2 * len(PARQUET_MAGIC) + 4 and file.read() == PARQUET_MAGIC:
                return "parquet"
            raise DatasetFormatError(
                "The file starts like Parquet but has no Parquet footer, so it is truncated or "
                "damaged; export it again and re-upload."
            )
    if head in ZIP_MAGICS:
        return _sniff_zip(path, limits)
    sniff_csv_dialect(path)
    return "csv"


def sniff_csv_dialect(path: Path) -> type[csv.Dialect]:
    """Detect the delimiter from the first 64 KiB, which must be UTF-8 text (a BOM is allowed)."""
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
        sniffed = csv.Sniffer().sniff(sample, delimiters=CSV_DELIMITERS)
    except csv.Error:
        return _dialect_from_header(text.splitlines()[0])
    # Only the delimiter is trusted: the Sniffer's quoting guesses turn off the standard ""
    # escape on cells holding quotes and line breaks, common in text data.
    return type("SniffedDialect", (csv.excel,), {"delimiter": sniffed.delimiter})


def _dialect_from_header(header: str) -> type[csv.Dialect]:
    """The Sniffer gives up when rows disagree; the header's most frequent delimiter then wins,
    so that reading the rows can report exactly which row is wrong."""
    counts = {delimiter: header.count(delimiter) for delimiter in CSV_DELIMITERS}
    delimiter = max(counts, key=counts.__getitem__)
    if not counts[delimiter]:
        return csv.excel  # a single column has no delimiter to find
    return type("HeaderDialect", (csv.excel,), {"delimiter": delimiter})


def not_a_dataset() -> DatasetFormatError:
    return DatasetFormatError(
        "The file is not a CSV, Parquet, .npz or zip of images; "
        "export the data in one of those formats and upload it again."
    )


def _sniff_zip(path: Path, limits: DatasetLimits) -> str:
    with open_checked_zip(path, limits=limits) as archive:
        entries = [info for info in archive.infolist() if not info.is_dir()]
        named_npy = bool(entries) and all(info.filename.endswith(".npy") for info in entries)
        if named_npy and all(_starts_with_npy_magic(archive, info) for info in entries):
            return "npz"
    return "image_folder_zip"


def _starts_with_npy_magic(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bool:
    check_entry(info)
    with reading_entry(archive, info) as entry:
        return entry.read(len(NPY_MAGIC)) == NPY_MAGIC
