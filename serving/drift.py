"""Drift arithmetic: how far a window of live values moved from a reference (the profile of the
training data, or an earlier window), column by column. Pure NumPy, no database.

What a customer can be told about each number:

- Numeric column: `distance = W1(reference, window) / std(reference)`, the Wasserstein-1
  (earth mover's) distance between the two distributions, in reference standard deviations: a
  shift of every value by half a standard deviation reads 0.5. W1 is computed exactly as
  `integral over u in [0,1] of |Q_ref(u) - Q_win(u)| du` between quantile functions: the
  window's is its empirical one (a step per value); the reference's is linear between the
  quantiles the training profile keeps (every percentile and six more in the tails, from a
  seeded sample of up to 10,000 values). Profiles recorded before
  quantiles were kept are read through their 20-bin histogram instead (values spread evenly
  within each bin), which blurs shifts smaller than a bin; the column's `method` then says
  "wasserstein_histogram".
- Categorical column: `distance = sqrt(JS(P, Q))`, the Jensen-Shannon distance in base 2, so
  0 for the same distribution and 1 for distributions with no value in common. The buckets are
  the reference's top values plus one "everything else" bucket; a value the training data never
  held falls into that bucket, which is empty in the reference when its top list was complete,
  so new categories count fully.
- Constant reference column (standard deviation 0): the share of window values equal to the
  constant is compared as a categorical column of one value ("constant" method).
- Nulls and unusable values (text in a numeric column, NaN, infinities, nested objects) are left
  out of the distance and counted in `missing_share`. A column also drifts when that share rose
  by at least the column threshold over the reference's null share: a caller that stopped
  sending a feature (the column missing from every row) has moved, whatever its few remaining
  values say.
- A column drifts at `distance >= column_threshold` (0.1 by default); the window drifts when the
  share of compared columns that drifted is `>= share_threshold` (0.5 by default).

Predictions are compared the same way: a classifier's labels as a categorical column, a
forecaster's per-request forecast means as a numeric one.

Inputs that are not table rows are compared through a few numbers read cheaply from each one
(INPUT_FEATURES), as numeric columns: a text's length in characters and in whitespace-separated
words; a time series history's length, level (mean) and scale (standard deviation) over its last
MAX_HISTORY_VALUES values; an image's encoded size in bytes and its width and height from the
file header (no pixel is decoded, so brightness is not watched).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from registry.formats.image_headers import read_image_header
from registry.formats.profiling import QUANTILE_LEVELS, quantiles

DEFAULT_COLUMN_THRESHOLD = 0.1
DEFAULT_SHARE_THRESHOLD = 0.5
# Keys are compared on this many characters, as the profile counts them.
CATEGORY_KEY_CHARS = 200
# A window profile (kept as the baseline of later windows) lists at most this many values.
WINDOW_TOP_VALUES = 100
_OTHER = object()
MAX_HISTORY_VALUES = 10_000
# Enough base64 for any header read_image_header parses (it scans a JPEG up to 1 MiB).
_IMAGE_HEAD_CHARS = 4 * (1024 * 1024 // 3 + 1)


@dataclass
class WindowDrift:
    columns: dict[str, dict] = field(default_factory=dict)
    drifted_share: float = 0.0
    drifted: bool = False


# -- distances -----------------------------------------------------------------------------


def wasserstein_samples(first: Sequence[float], second: Sequence[float]) -> float:
    """The exact Wasserstein-1 distance between two empirical samples: the area between their
    cumulative distribution functions."""
    a = np.sort(np.asarray(first, dtype=np.float64))
    b = np.sort(np.asarray(second, dtype=np.float64))
    if not a.size or not b.size:
        raise ValueError("Both samples need at least one value.")
    points = np.concatenate([a, b])
    points.sort(kind="mergesort")
    widths = np.diff(points)
    cdf_a = np.searchsorted(a, points[:-1], side="right") / a.size
    cdf_b = np.searchsorted(b, points[:-1], side="right") / b.size
    return float(np.sum(np.abs(cdf_a - cdf_b) * widths))


def wasserstein_to_quantiles(
    levels: np.ndarray, knots: np.ndarray, sample: Sequence[float]
) -> float:
    """W1 between a reference given as a piecewise-linear quantile function (`knots[i]` is the
    `levels[i]` quantile, levels rising from 0 to 1) and an empirical sample, integrated exactly
    over the quantile levels."""
    values = np.sort(np.asarray(sample, dtype=np.float64))
    n = values.size
    if not n:
        raise ValueError("The sample needs at least one value.")
    with np.errstate(all="ignore"):  # values near the float range's edge overflow to inf
        return _quantile_area(levels, knots, values)


def _quantile_area(levels: np.ndarray, knots: np.ndarray, values: np.ndarray) -> float:
    n = values.size
    grid = np.union1d(levels, np.arange(n + 1) / n)
    start, end = grid[:-1], grid[1:]
    middle = (start + end) / 2
    piece = np.clip(np.searchsorted(levels, middle, side="right") - 1, 0, levels.size - 2)
    low, high = levels[piece], levels[piece + 1]
    slope = (knots[piece + 1] - knots[piece]) / (high - low)
    window = values[np.minimum((middle * n).astype(np.int64), n - 1)]
    at_start = knots[piece] + slope * (start - low) - window
    at_end = knots[piece] + slope * (end - low) - window
    same_sign = at_start * at_end >= 0
    magnitude = np.abs(at_start) + np.abs(at_end)
    crossing = np.where(magnitude > 0, (at_start**2 + at_end**2) / (2 * magnitude), 0.0)
    area = np.where(same_sign, magnitude / 2, crossing) * (end - start)
    return float(area.sum())


def js_distance(first: Mapping[Any, float], second: Mapping[Any, float]) -> float:
    """The Jensen-Shannon distance (base 2, in [0, 1]) between two distributions given as counts
    (or weights) per value; a value missing from one side has weight 0 there."""
    keys = list(first.keys() | second.keys())
    p = np.asarray([max(float(first.get(key, 0.0)), 0.0) for key in keys])
    q = np.asarray([max(float(second.get(key, 0.0)), 0.0) for key in keys])
    if p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("Both distributions need some weight.")
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    divergence = 0.5 * _kl(p, m) + 0.5 * _kl(q, m)
    return float(math.sqrt(min(max(divergence, 0.0), 1.0)))


def _kl(p: np.ndarray, m: np.ndarray) -> float:
    present = p > 0
    return float(np.sum(p[present] * np.log2(p[present] / m[present])))


# -- reading values ------------------------------------------------------------------------


def as_number(value: Any) -> float | None:
    """A finite float for a JSON number; None for anything else (nulls, text, booleans, NaN,
    infinities, integers too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def category_key(value: Any) -> str | None:
    """The text a categorical value is compared by; None for nulls and values no column holds
    (objects, arrays, NaN)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value[:CATEGORY_KEY_CHARS]
    if isinstance(value, int):
        try:
            return str(value)[:CATEGORY_KEY_CHARS]
        except ValueError:  # more digits than Python will print
            return None
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return None


def column_values(rows: Iterable[Any], name: str) -> list[Any]:
    """The value of column `name` in each row; None where the row lacks it or is not an object."""
    return [row.get(name) if isinstance(row, dict) else None for row in rows]


# -- profiles of a window (the baseline later windows are compared with) ----------------------


def numeric_profile(values: Sequence[Any]) -> dict:
    """A numeric column's profile in the training profile's shape (with `quantiles`)."""
    numbers = [number for value in values if (number := as_number(value)) is not None]
    profile: dict[str, Any] = {"count": len(numbers), "nulls": len(values) - len(numbers)}
    if not numbers:
        return {**profile, "mean": None, "std": None, "min": None, "max": None}
    array = np.asarray(numbers, dtype=np.float64)
    with np.errstate(all="ignore"):  # overflow gives inf, which the report stores as null
        return {
            **profile,
            "mean": float(array.mean()),
            "std": float(array.std(ddof=1)) if array.size > 1 else None,
            "min": float(array.min()),
            "max": float(array.max()),
            "quantiles": quantiles(numbers),
        }


def categorical_profile(values: Sequence[Any]) -> dict:
    """A categorical column's profile in the training profile's shape (`top` of at most
    WINDOW_TOP_VALUES values, so a flood of distinct values stays small)."""
    counts: dict[str, int] = {}
    for value in values:
        key = category_key(value)
        if key is not None:
            counts[key] = counts.get(key, 0) + 1
    top = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return {
        "count": sum(counts.values()),
        "nulls": len(values) - sum(counts.values()),
        "distinct": len(counts),
        "distinct_is_lower_bound": False,
        "top": [[key, count] for key, count in top[:WINDOW_TOP_VALUES]],
    }


# -- comparing one column --------------------------------------------------------------------


def column_kind(reference: Any) -> str | None:
    """ "numeric", "categorical", or None for a column the monitor cannot compare (datetimes,
    all-null columns, anything that is not a column profile)."""
    if not isinstance(reference, dict):
        return None
    if _has_numbers(reference):
        return "numeric"
    if isinstance(reference.get("top"), list) and reference["top"]:
        return "categorical"
    return None


def compare_column(reference: dict, values: Sequence[Any], *, threshold: float) -> dict:
    """How far `values` (the window's raw values of one column, nulls included) moved from the
    column `reference` (a profile entry; see column_kind)."""
    kind = column_kind(reference)
    if kind is None:
        raise ValueError("The reference is not a numeric or categorical column profile.")
    if kind == "numeric":
        usable: list[Any] = [n for value in values if (n := as_number(value)) is not None]
    else:
        usable = [k for value in values if (k := category_key(value)) is not None]
    missing_share = 1 - len(usable) / len(values) if values else 1.0
    null_share_change = missing_share - _null_share(reference)
    result: dict[str, Any] = {
        "kind": kind,
        "rows": len(values),
        "missing_share": missing_share,
        "null_share_change": null_share_change,
    }
    if not usable:
        result.update(method=None, distance=None)
    elif kind == "numeric":
        result.update(_numeric_distance(reference, usable))
    else:
        result.update(method="jensen_shannon", distance=_categorical_distance(reference, usable))
    distance = result["distance"]
    if distance is not None and not math.isfinite(distance):
        # Values near the float range's edge overflow the arithmetic: nothing training saw.
        result.update(distance=None, overflow=True)
    result["drifted"] = bool(
        result.get("overflow")
        or (result["distance"] is not None and result["distance"] >= threshold)
        or null_share_change >= threshold
    )
    return result


def _has_numbers(reference: dict) -> bool:
    if not reference.get("count") or reference.get("mean") is None:
        return False
    quantiles = reference.get("quantiles")
    histogram = reference.get("histogram")
    return bool(quantiles) or bool(isinstance(histogram, dict) and histogram.get("counts"))


def _null_share(reference: dict) -> float:
    count, nulls = reference.get("count") or 0, reference.get("nulls") or 0
    non_finite = reference.get("non_finite") or 0
    total = count + nulls
    return (nulls + non_finite) / total if total else 0.0


def _numeric_distance(reference: dict, numbers: list[float]) -> dict:
    std = reference.get("std")
    low, high = reference.get("min"), reference.get("max")
    if not std or not math.isfinite(std) or (low is not None and low == high):
        constant = low if low is not None else reference["mean"]
        equal = sum(1 for number in numbers if number == constant)
        distance = js_distance({"constant": 1}, {"constant": equal, "other": len(numbers) - equal})
        return {"method": "constant", "distance": distance}
    if reference.get("quantiles"):
        knots = np.asarray(reference["quantiles"], dtype=np.float64)
        if knots.size == len(QUANTILE_LEVELS):
            levels = np.asarray(QUANTILE_LEVELS, dtype=np.float64)
        else:  # evenly spaced, from its minimum to its maximum
            levels = np.linspace(0.0, 1.0, knots.size)
        method = "wasserstein"
    else:
        levels, knots = _histogram_quantiles(reference["histogram"])
        method = "wasserstein_histogram"
    _check_quantile_function(levels, knots)
    return {"method": method, "distance": wasserstein_to_quantiles(levels, knots, numbers) / std}


def _check_quantile_function(levels: np.ndarray, knots: np.ndarray) -> None:
    if (
        knots.size < 2
        or not np.all(np.isfinite(knots))
        or not np.all(np.isfinite(levels))
        or levels[0] != 0.0
        or levels[-1] != 1.0
        or np.any(np.diff(levels) < 0)
        or np.any(np.diff(knots) < 0)
    ):
        raise ValueError("The reference's quantiles are not a quantile function.")


def _histogram_quantiles(histogram: dict) -> tuple[np.ndarray, np.ndarray]:
    """The quantile function of a histogram with its counts spread evenly within each bin."""
    counts = np.asarray(histogram["counts"], dtype=np.float64)
    edges = np.asarray(histogram["edges"], dtype=np.float64)
    levels = np.concatenate([[0.0], np.cumsum(counts)]) / counts.sum()
    return levels, edges


def _categorical_distance(reference: dict, keys: list[str]) -> float:
    expected: dict[Any, float] = {}
    for value, count in reference["top"]:
        key = category_key(value)
        if key is not None:
            expected[key] = expected.get(key, 0) + max(float(count), 0.0)
    rest = (reference.get("count") or 0) - sum(expected.values())
    expected[_OTHER] = max(rest, 0.0)
    observed: dict[Any, float] = {}
    for key in keys:
        bucket = key if key in expected else _OTHER
        observed[bucket] = observed.get(bucket, 0) + 1
    return js_distance(expected, observed)


# -- comparing a window ----------------------------------------------------------------------


def compare_window(
    reference: Mapping[str, Any],
    rows: Sequence[Any],
    *,
    column_threshold: float = DEFAULT_COLUMN_THRESHOLD,
    share_threshold: float = DEFAULT_SHARE_THRESHOLD,
    exclude: Iterable[str] = (),
) -> WindowDrift:
    """Compare each comparable column of the `reference` profile (minus `exclude`, e.g. the
    target) with the rows of a window ({column: value} each; anything else reads as all nulls).
    Columns the window has and the reference lacks are not compared; a reference column that
    cannot be read is reported with an `error` and not counted."""
    skip = set(exclude)
    columns = {
        name: compare_or_explain(column, column_values(rows, name), threshold=column_threshold)
        for name, column in reference.items()
        if name not in skip and column_kind(column) is not None
    }
    compared = [result for result in columns.values() if "error" not in result]
    if not compared:
        return WindowDrift(columns=columns)
    share = sum(result["drifted"] for result in compared) / len(compared)
    return WindowDrift(columns=columns, drifted_share=share, drifted=share >= share_threshold)


def compare_or_explain(reference: dict, values: Sequence[Any], *, threshold: float) -> dict:
    """compare_column, except that a reference that cannot be read (a damaged profile) is
    reported with the reason (`error`), so one bad column does not stop the whole window."""
    try:
        return compare_column(reference, values, threshold=threshold)
    except ValueError as error:
        return {
            "kind": column_kind(reference),
            "distance": None,
            "drifted": False,
            "error": str(error),
        }


# -- numbers read from inputs that are not table rows -----------------------------------------


def text_features(item: Any) -> dict[str, float]:
    text = item.get("text") if isinstance(item, dict) else None
    if not isinstance(text, str):
        return {}
    return {"text.chars": float(len(text)), "text.words": float(len(text.split()))}


def series_features(item: Any) -> dict[str, float]:
    history = item.get("history") if isinstance(item, dict) else None
    if not isinstance(history, list) or not history:
        return {}
    numbers = [as_number(value) for value in history[-MAX_HISTORY_VALUES:]]
    if any(number is None for number in numbers):
        return {"history.length": float(len(history))}
    values = np.asarray(numbers, dtype=np.float64)
    with np.errstate(all="ignore"):  # overflow gives inf, which the report stores as null
        return {
            "history.length": float(len(history)),
            "history.level": float(values.mean()),
            "history.scale": float(values.std()),
        }


def image_features(item: Any) -> dict[str, float]:
    encoded = item.get("image") if isinstance(item, dict) else None
    if not isinstance(encoded, str) or not encoded:
        return {}
    features = {"image.bytes": float(len(encoded) * 3 // 4)}
    head = encoded[:_IMAGE_HEAD_CHARS]
    try:
        header = read_image_header(io.BytesIO(base64.b64decode(head[: len(head) // 4 * 4])))
    except (binascii.Error, ValueError, struct.error):
        header = None
    if header is not None:
        features.update({"image.width": float(header.width), "image.height": float(header.height)})
    return features


INPUT_FEATURES = {
    "text-classifier": (text_features, ("text.chars", "text.words")),
    "timeseries-forecaster": (
        series_features,
        ("history.length", "history.level", "history.scale"),
    ),
    "image-classifier": (image_features, ("image.bytes", "image.width", "image.height")),
}


def input_features(recipe: str, inputs: Sequence[Any]) -> tuple[tuple[str, ...], list[dict]]:
    """The feature names of `recipe` and each input's features as a row ({} for an input they
    cannot be read from: it counts as missing)."""
    read, names = INPUT_FEATURES[recipe]
    return names, [read(item) for item in inputs]
