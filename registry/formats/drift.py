"""Compare two dataset profiles column by column, to tell whether new data drifted from old.

Deliberately simple, and documented so its numbers can be explained to a customer:

- `null_rate_change`: the new share of nulls minus the old one.
- `mean_shift_std`: how far the mean moved, in old standard deviations (numeric columns).
- `psi`: the population stability index. Numeric columns: the new histogram is spread uniformly
  within its bins onto the old bins, plus one bucket below and one above the old range, so values
  moving out of the old range count fully. Categorical columns: the values in both profiles' top
  lists, plus one bucket for everything else (counts outside the top lists are not known).
- `drifted`: any of the three past its threshold below.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable

# The usual reading of PSI: under 0.1 stable, 0.1 to 0.25 moderate, over 0.25 a real shift.
PSI_DRIFT = 0.25
MEAN_SHIFT_DRIFT = 0.5
NULL_RATE_DRIFT = 0.05
# Stands in for an empty bucket so PSI stays finite.
_EMPTY_SHARE = 1e-4


def compare_profiles(old: dict, new: dict) -> dict:
    """A drift summary of two profiles from `inspect_dataset`, old first."""
    old_columns, new_columns = _columns(old), _columns(new)
    columns = {
        name: _compare_column(old_columns[name], new_columns[name])
        for name in old_columns
        if name in new_columns
    }
    return {
        "added_columns": sorted(set(new_columns) - set(old_columns)),
        "removed_columns": sorted(set(old_columns) - set(new_columns)),
        "drifted_columns": [name for name, summary in columns.items() if summary["drifted"]],
        "columns": columns,
    }


def _columns(profile: dict) -> dict[str, dict]:
    """Column profiles by name; an image zip's profile is read as one categorical `label`."""
    if "classes" in profile and "image_sizes" in profile:
        classes = profile["classes"]
        top = [[label, count] for label, count in classes.items()]
        return {"label": {"count": sum(classes.values()), "nulls": 0, "top": top}}
    return {name: column for name, column in profile.items() if isinstance(column, dict)}


def _compare_column(old: dict, new: dict) -> dict:
    null_rate_change = _null_rate(new) - _null_rate(old)
    mean_shift_std = psi = None
    if "histogram" in old and "histogram" in new:
        mean_shift_std = _mean_shift(old, new)
        psi = _histogram_psi(old["histogram"], new["histogram"])
    elif "top" in old and "top" in new:
        psi = _category_psi(old, new)
    drifted = (
        abs(null_rate_change) >= NULL_RATE_DRIFT
        or (mean_shift_std is not None and abs(mean_shift_std) >= MEAN_SHIFT_DRIFT)
        or (psi is not None and psi >= PSI_DRIFT)
    )
    return {
        "null_rate_change": null_rate_change,
        "mean_shift_std": mean_shift_std,
        "psi": psi,
        "drifted": drifted,
    }


def _null_rate(column: dict) -> float:
    total = column.get("count", 0) + column.get("nulls", 0)
    return column.get("nulls", 0) / total if total else 0.0


def _mean_shift(old: dict, new: dict) -> float | None:
    """None when the old column was constant: PSI then says whether the values moved."""
    if old.get("mean") is None or new.get("mean") is None or not old.get("std"):
        return None
    return (new["mean"] - old["mean"]) / old["std"]


def _histogram_psi(old: dict, new: dict) -> float | None:
    if not old["counts"] or not new["counts"]:
        return None
    expected = [0, *old["counts"], 0]
    actual = _rebin(new["edges"], new["counts"], old["edges"])
    return _psi(expected, actual)


def _rebin(edges: list[float], counts: list[int], onto: list[float]) -> list[float]:
    """Spread each bin's count uniformly over the buckets (-inf, onto[0]), onto's bins, (onto[-1],
    inf), in proportion to how much of the bin each bucket covers."""
    bounds = [-math.inf, *onto, math.inf]
    buckets = [0.0] * (len(bounds) - 1)
    for (low, high), count in zip(itertools.pairwise(edges), counts, strict=True):
        for index, (start, end) in enumerate(itertools.pairwise(bounds)):
            if high > low:
                share = max(0.0, min(high, end) - max(low, start)) / (high - low)
            else:  # a zero-width bin is a point: it lands in the bucket that holds it
                share = 1.0 if start <= low < end else 0.0
            buckets[index] += count * share
    return buckets


def _category_psi(old: dict, new: dict) -> float | None:
    old_top, new_top = _top_counts(old), _top_counts(new)
    shared = old_top.keys() & new_top.keys()
    if not shared:
        return None
    expected = [old_top[value] for value in shared] + [_rest(old, old_top, shared)]
    actual = [new_top[value] for value in shared] + [_rest(new, new_top, shared)]
    return _psi(expected, actual)


def _top_counts(column: dict) -> dict[Hashable, int]:
    return {value: count for value, count in column["top"]}


def _rest(column: dict, top: dict[Hashable, int], shared: set[Hashable]) -> int:
    return column.get("count", 0) - sum(top[value] for value in shared)


def _psi(expected: list[float], actual: list[float]) -> float | None:
    expected_total, actual_total = sum(expected), sum(actual)
    if not expected_total or not actual_total:
        return None
    psi = 0.0
    for expected_count, actual_count in zip(expected, actual, strict=True):
        before = max(expected_count / expected_total, _EMPTY_SHARE)
        after = max(actual_count / actual_total, _EMPTY_SHARE)
        psi += (after - before) * math.log(after / before)
    return psi
