"""Bounded-memory column statistics shared by every reader.

Each accumulator sees a column once, value by value (CSV) or array by array (Parquet, .npz), and
keeps a fixed amount of state however long the column is. Histograms are drawn from a seeded
reservoir sample, not from every value, so they are exact in shape only for short columns.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

HISTOGRAM_BINS = 20
# The quantiles of the sample kept for serving's drift monitor, which measures Wasserstein
# distances against them (a 20-bin histogram blurs a shift of a fraction of a bin): every
# percentile, and more in the tails, where a long tail's quantiles bend too much for a straight
# line between percentiles to follow them. Profiles store only the values, so a change of levels
# must change their number too (readers tell the levels by the count).
QUANTILE_LEVELS = (
    0.0,
    0.001,
    0.002,
    0.005,
    *(step / 100 for step in range(1, 100)),
    0.995,
    0.998,
    0.999,
    1.0,
)
TOP_VALUES = 10
# Long strings are counted by their first characters, so a column of essays cannot fill memory.
COUNTED_VALUE_CHARS = 200

# Memory for samples and distinct counts is shared across columns: a 2,000-column file gets
# smaller per-column samples than a 5-column one, so the total stays near a few tens of MB.
_SAMPLE_VALUES_BUDGET = 2_000_000
_DISTINCT_VALUES_BUDGET = 200_000


def sample_size_for(columns: int) -> int:
    return max(500, min(10_000, _SAMPLE_VALUES_BUDGET // max(columns, 1)))


def distinct_capacity_for(columns: int) -> int:
    return max(100, min(10_000, _DISTINCT_VALUES_BUDGET // max(columns, 1)))


class Reservoir:
    """A uniform sample of fixed size from a stream of unknown length (Li's Algorithm L).

    Algorithm L draws how many items to skip instead of a random number per item, so offering a
    whole array costs time only for the few items that enter the sample.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.items: list[float] = []
        self._rng = random.Random(seed)  # noqa: S311 - sampling needs repeatability, not secrecy
        self._seen = 0
        self._weight = 1.0
        self._next = size

    def offer(self, value: float) -> None:
        if len(self.items) < self.size:
            self.items.append(float(value))
            if len(self.items) == self.size:
                self._schedule_after(self._seen)
        elif self._seen == self._next:
            self.items[self._rng.randrange(self.size)] = float(value)
            self._schedule_after(self._seen)
        self._seen += 1

    def offer_batch(self, values: Sequence[Any]) -> None:
        length = len(values)
        start = self._seen
        index = 0
        while len(self.items) < self.size and index < length:
            self.items.append(float(values[index]))
            index += 1
            if len(self.items) == self.size:
                self._schedule_after(start + index - 1)
        while self._next < start + length:
            self.items[self._rng.randrange(self.size)] = float(values[self._next - start])
            self._schedule_after(self._next)
        self._seen += length

    def _schedule_after(self, position: int) -> None:
        self._weight *= math.exp(math.log(self._uniform()) / self.size)
        if self._weight < 1.0:
            gap = math.floor(math.log(self._uniform()) / math.log1p(-self._weight))
        else:  # a draw within rounding of 1 made the weight 1.0; take the next item
            gap = 0
        self._next = position + gap + 1

    def _uniform(self) -> float:
        """A uniform number in (0, 1): both logarithms above need it strictly inside."""
        value = self._rng.random()
        return value if value > 0.0 else 0.5


class NumericSummary:
    """Count, mean, variance, min, max and a sample of the finite values of one column.

    Single values update with Welford's method; whole arrays merge with Chan's formula, so
    neither path accumulates the rounding error of a naive sum of squares.
    """

    def __init__(self, *, sample_size: int, seed: int) -> None:
        self.count = 0
        self.non_finite = 0
        self.minimum: float | int | None = None
        self.maximum: float | int | None = None
        self.sample = Reservoir(sample_size, seed)
        self._mean = 0.0
        self._m2 = 0.0

    def add(self, value: float | int) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            self.non_finite += 1
            return
        self.count += 1
        delta = value - self._mean
        self._mean += delta / self.count
        self._m2 += delta * (value - self._mean)
        if self.minimum is None or value < self.minimum:
            self.minimum = value
        if self.maximum is None or value > self.maximum:
            self.maximum = value
        self.sample.offer(value)

    def add_array(self, values: np.ndarray, extremes: tuple[int, int] | None = None) -> None:
        """Add a 1-D numeric array (no nulls; NaN and infinity are counted as non-finite).

        `extremes` are its exact least and greatest values when they are integers that float64
        would round (past 2**53), so an integer column's min and max stay exact.
        """
        values = values.astype(np.float64, copy=False)
        finite = np.isfinite(values)
        if not finite.all():
            self.non_finite += int(values.size - finite.sum())
            values = values[finite]
        if values.size == 0:
            return
        batch_count = int(values.size)
        batch_mean = float(values.mean())
        batch_m2 = float(np.square(values - batch_mean).sum())
        total = self.count + batch_count
        delta = batch_mean - self._mean
        self._mean += delta * batch_count / total
        self._m2 += batch_m2 + delta * delta * self.count * batch_count / total
        self.count = total
        low, high = extremes or (float(values.min()), float(values.max()))
        self.minimum = low if self.minimum is None else min(self.minimum, low)
        self.maximum = high if self.maximum is None else max(self.maximum, high)
        self.sample.offer_batch(values)

    def profile(self, *, nulls: int, integer: bool = False) -> dict:
        """The column's profile: `count` is its non-null values, `std` the sample (n-1) one."""
        as_number: Callable[[float | int], float | int] = int if integer else float
        return {
            "count": self.count + self.non_finite,
            "nulls": nulls,
            "non_finite": self.non_finite,
            "mean": self._mean if self.count else None,
            "std": math.sqrt(self._m2 / (self.count - 1)) if self.count > 1 else None,
            "min": None if self.minimum is None else as_number(self.minimum),
            "max": None if self.maximum is None else as_number(self.maximum),
            "histogram": histogram(self.sample.items),
            "quantiles": quantiles(self.sample.items),
        }


def quantiles(sample: Sequence[float]) -> list[float]:
    """The sample's quantiles at QUANTILE_LEVELS, its minimum to its maximum; empty for an empty
    sample. Each is one of the sample's values (no interpolation between two), so values near the
    float range's edge cannot overflow into an infinity the profile's JSON could not hold; kept
    to 7 significant digits, which is finer than any drift a sample can show, so that a wide
    file's profile stays small."""
    if not sample:
        return []
    values = np.quantile(
        np.asarray(sample, dtype=np.float64), QUANTILE_LEVELS, method="inverted_cdf"
    )
    return [float(f"{value:.7g}") for value in values]


def histogram(sample: Sequence[float]) -> dict:
    """Equal-width bins over a sample; `counts` sums to `sample_size`."""
    if not sample:
        return {"edges": [], "counts": [], "sample_size": 0}
    counts, edges = np.histogram(np.asarray(sample, dtype=np.float64), bins=HISTOGRAM_BINS)
    return {
        "edges": [float(edge) for edge in edges],
        "counts": [int(count) for count in counts],
        "sample_size": len(sample),
    }


class TopValues:
    """Counts per distinct value, holding at most `capacity` of them.

    Once full, values not yet seen are no longer counted: `distinct` becomes a lower bound (the
    profile says so) and `top` is exact for values that first appeared before the cap was hit.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.overflowed = False
        self._counts: dict[Hashable, int] = {}

    def counted(self) -> list[Hashable]:
        return list(self._counts)

    def add(self, value: Hashable, count: int = 1) -> None:
        if isinstance(value, str) and len(value) > COUNTED_VALUE_CHARS:
            value = value[:COUNTED_VALUE_CHARS]
        if value in self._counts:
            self._counts[value] += count
        elif len(self._counts) < self.capacity:
            self._counts[value] = count
        else:
            self.overflowed = True

    def profile(
        self, *, count: int, nulls: int, relabel: Callable[[Hashable], Hashable] | None = None
    ) -> dict:
        counts = self._counts
        if relabel is not None:
            counts = {}
            for value, value_count in self._counts.items():
                label = relabel(value)
                counts[label] = counts.get(label, 0) + value_count
        top = sorted(counts.items(), key=lambda item: (-item[1], str(item[0])))[:TOP_VALUES]
        return {
            "count": count,
            "nulls": nulls,
            "distinct": len(counts),
            "distinct_is_lower_bound": self.overflowed,
            "top": [[value, value_count] for value, value_count in top],
        }
