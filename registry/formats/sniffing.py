"""Decide a dataset's format from its bytes, never from the name the uploader gave it."""

from __future__ import annotations

import zipfile
from pathlib import Path

from registry.formats.archives import check_entry, open_checked_zip, reading_entry
from registry.formats.base import DEFAULT_LIMITS, DatasetFormatError, DatasetLimits
from registry.formats.csv_reader import detect_csv_dialect

PARQUET_MAGIC = b"PAR1"
# A zip starts with a local file header, or with the end record when it holds nothing.
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
NPY_MAGIC = b"\x93NUMPY"


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
    detect_csv_dialect(path)
    return "csv"


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
