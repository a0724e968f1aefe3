"""Dataset uploads: decide the format from the content, enforce the limits, infer the schema
and profile every column, all in one streaming pass and without unpickling anything.

Formats: "csv", "parquet", "npz" and "image_folder_zip". Schema dtypes: "int64", "float64",
"bool", "string", "datetime", "binary", "list", "struct", "other" for tables; NumPy's own names
("float32", "uint8", ...) or "string", "binary", "datetime", "duration" for .npz arrays, with a
"shape"; "image" and "string" for the two columns of an image zip. `nullable` means nulls were
seen.

Profiles are keyed by column (by array for .npz). Every column has `count` (non-null values;
elements for arrays) and `nulls`. Numeric columns add `non_finite` (NaN and infinities, left out
of the rest), `mean`, `std` (n-1), `min`, `max` and a `histogram` ({"edges", "counts",
"sample_size"}) drawn from a seeded sample of up to 10,000 values, so its counts sum to
`sample_size`, not to `count`, and `quantiles` of the same sample at
profiling.QUANTILE_LEVELS (every percentile plus 0.1%, 0.2%, 0.5% and their mirrors; absent
from profiles recorded before they were added). Text and boolean columns add
`distinct` (a lower bound when `distinct_is_lower_bound`) and `top` ([[value, count], ...], at
most 10). Datetime columns add `min` and `max` as ISO strings. An image zip's profile is
{"classes": {label: count}, "image_sizes": {"width", "height": {"min", "max", "mean"},
"formats": {format: count}}}.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from registry.formats.base import (
    DEFAULT_LIMITS,
    FORMAT_NAMES,
    DatasetFormatError,
    DatasetInspection,
    DatasetLimits,
)
from registry.formats.drift import compare_profiles
from registry.formats.sniffing import sniff_format

__all__ = [
    "DatasetFormatError",
    "DatasetInspection",
    "DatasetLimits",
    "check_format",
    "compare_profiles",
    "inspect_dataset",
    "sniff_format",
]

# What an uploader may call the format: our names and the usual file extensions.
_DECLARED_FORMATS = {
    "csv": "csv",
    "parquet": "parquet",
    "pq": "parquet",
    "npz": "npz",
    "zip": "image_folder_zip",
    "image_folder_zip": "image_folder_zip",
}
_EXTENSIONS = {"csv": ".csv", "parquet": ".parquet", "npz": ".npz", "image_folder_zip": ".zip"}


def inspect_dataset(
    path: Path,
    *,
    limits: DatasetLimits = DEFAULT_LIMITS,
    declared_format: str | None = None,
    progress: Callable[[float], None] | None = None,
) -> DatasetInspection:
    """Check the file against `limits` and return its schema, profile and preview.

    Raises DatasetFormatError when the content is not an accepted dataset, breaks a limit, or is
    not the `declared_format` (a file whose name lies about its content is refused). CSV and
    Parquet call `progress` with the fraction read so far as they go.
    """
    detected = check_format(path, limits=limits, declared_format=declared_format)
    return _inspector(detected, progress)(path, limits)


def check_format(
    path: Path, *, limits: DatasetLimits = DEFAULT_LIMITS, declared_format: str | None = None
) -> str:
    """The first, cheap part of `inspect_dataset`: the size, the format the content is, and
    whether that is the one declared; returns the format. Reads the head of a CSV, the ends of
    a Parquet file, the directory of a zip, never the data."""
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise DatasetFormatError(
            f"The file is {size:,} bytes, over our limit of {limits.max_bytes:,}; "
            "split it into smaller files."
        )
    detected = sniff_format(path, limits=limits)
    if declared_format is not None:
        _check_declared(declared_format, detected)
    return detected


def _check_declared(declared_format: str, detected: str) -> None:
    declared = _DECLARED_FORMATS.get(declared_format.lower().lstrip("."))
    if declared is None:
        raise DatasetFormatError(
            f"{declared_format!r} is not a dataset format we accept; "
            "upload a .csv, .parquet, .npz or .zip of images."
        )
    if declared != detected:
        raise DatasetFormatError(
            f"The file says {_EXTENSIONS[declared]} but its content is {FORMAT_NAMES[detected]}; "
            f"rename it to {_EXTENSIONS[detected]} or upload the file you meant."
        )


def _inspector(
    detected: str, progress: Callable[[float], None] | None
) -> Callable[[Path, DatasetLimits], DatasetInspection]:
    """Import each reader only when its format arrives: pyarrow alone adds a noticeable start-up
    cost that a web process which never sees Parquet should not pay."""
    if detected == "csv":
        from registry.formats.csv_files import inspect_csv

        return partial(inspect_csv, progress=progress)
    if detected == "parquet":
        from registry.formats.parquet_files import inspect_parquet

        return partial(inspect_parquet, progress=progress)
    if detected == "npz":
        from registry.formats.npz_files import inspect_npz

        return inspect_npz
    from registry.formats.image_zips import inspect_image_zip

    return inspect_image_zip
