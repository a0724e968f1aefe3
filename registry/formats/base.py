"""The result and error types every dataset reader shares, and the JSON-safety helper."""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from tenants.errors import DomainError

PREVIEW_ROWS = 20
# A preview shows a cell's start: a long text in the first rows would otherwise be stored whole
# on the version and sent with every read of it.
PREVIEW_TEXT_CHARS = 1_000
# The most one cell may hold, in any format: a CSV row, a Parquet value, a text array element.
MAX_CELL_BYTES = 4 * 1024 * 1024

FORMAT_NAMES = {
    "csv": "CSV",
    "parquet": "Parquet",
    "npz": "a NumPy .npz archive",
    "image_folder_zip": "a zip of images",
}


class DatasetFormatError(DomainError):
    """The upload is not a dataset we accept; the message says what is wrong and how to fix it."""

    code = "invalid_dataset"
    status = 400


@dataclass(frozen=True)
class DatasetLimits:
    max_bytes: int = 5 * 1024**3
    max_rows: int = 50_000_000
    max_columns: int = 2_000
    max_archive_entries: int = 100_000
    max_uncompressed_bytes: int = 20 * 1024**3
    max_image_bytes: int = 50 * 1024**2


DEFAULT_LIMITS = DatasetLimits()


@dataclass(frozen=True)
class DatasetInspection:
    format: str
    row_count: int
    schema: list[dict]
    profile: dict
    preview: list[dict]
    # CSV only: the dialect it was read with (csv_reader.CsvDialect.as_json()), which every
    # later reader of the file must use.
    csv_dialect: dict | None = None


def not_a_dataset() -> DatasetFormatError:
    return DatasetFormatError(
        "The file is not a CSV, Parquet, .npz or zip of images; "
        "export the data in one of those formats and upload it again."
    )


def too_many_rows(limit: int) -> DatasetFormatError:
    return DatasetFormatError(
        f"The dataset has more than {limit:,} rows, the most we accept; "
        "split it into smaller files or sample it."
    )


def json_safe(value: Any) -> Any:
    """Turn a cell read from any format into a string, number, bool, None, list or dict.

    JSON has no NaN or infinity, so those become None like a missing value.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return json_safe(float(value))
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if hasattr(value, "item"):  # numpy scalars
        return json_safe(value.item())
    return str(value)


def preview_safe(value: Any) -> Any:
    """`json_safe(value)` with every text cut to PREVIEW_TEXT_CHARS characters (marked "…")."""
    value = json_safe(value)
    if isinstance(value, str) and len(value) > PREVIEW_TEXT_CHARS:
        return value[:PREVIEW_TEXT_CHARS] + "…"
    if isinstance(value, list):
        return [preview_safe(item) for item in value]
    if isinstance(value, dict):
        return {key: preview_safe(item) for key, item in value.items()}
    return value
