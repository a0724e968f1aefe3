"""The deployment page's charts: per model version over equal time windows, its request rate,
latency, error rate and live metric; and each input column's drift distance over the drift
reports. Drawn with the shared chart geometry (`charts`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import charts

from .selectors import VersionSeries, VersionStats

X_LABELS = 6


@dataclass(frozen=True)
class Range:
    """A span the page can show, cut into `windows` equal windows."""

    span: timedelta
    windows: int
    label: str

    @property
    def window(self) -> timedelta:
        return self.span / self.windows

    def end_after(self, now: datetime) -> datetime:
        """The first window boundary at or after `now`, boundaries counted from the epoch, so
        that windows start on round times (08:00, 08:05) and the last one holds `now`."""
        step = self.window.total_seconds()
        return datetime.fromtimestamp(math.ceil(now.timestamp() / step) * step, tz=now.tzinfo)


RANGES = {
    "1h": Range(timedelta(hours=1), 12, "Last hour"),
    "24h": Range(timedelta(hours=24), 24, "Last 24 hours"),
    "7d": Range(timedelta(days=7), 28, "Last 7 days"),
}
DEFAULT_RANGE = "24h"


def nice_ceiling(peak: float, *, at_least: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten (which may be below 1) at or above `peak`
    and `at_least`, so that quarters of it read as round numbers."""
    target = max(peak, at_least)
    power = 10 ** math.floor(math.log10(target))
    return next(f * power for f in (1, 2, 5, 10) if f * power >= target * (1 - 1e-9))


@dataclass(frozen=True)
class Line:
    name: str
    colour: str
    values: list[float | None]  # one per window; None: nothing to show there
    dashed: bool = False


def line_chart(
    *,
    key: str,
    title: str,
    starts: list[datetime],
    lines: list[Line],
    ceiling: float,
    label: Callable[[float], str],
) -> dict:
    """Lines over the windows from 0 up to `ceiling`, with axes, a legend and the same numbers
    as a table (for screen readers and for copying)."""
    frame = charts.FRAME_WITH_AXES
    count = len(starts)
    series = []
    for line in lines:
        positions: list[tuple[float, float] | None] = []
        points = []
        for index, value in enumerate(line.values):
            if value is None:
                positions.append(None)
                continue
            x, y = frame.slot_centre(index, count), frame.y(min(value, ceiling), high=ceiling)
            positions.append((x, y))
            points.append({"x": x, "y": y, "at": starts[index], "label": label(value)})
        series.append(
            {
                "name": line.name,
                "colour": line.colour,
                "dashed": line.dashed,
                "lines": charts.polylines(positions),
                "points": points,
            }
        )
    short = count and (starts[-1] - starts[0]) < timedelta(days=1)
    return {
        **frame.context(),
        "key": key,
        "title": title,
        "ticks": [
            {"y": tick.y, "label": label(tick.value)}
            for tick in frame.y_ticks(ceiling=ceiling, step=ceiling / 4)
        ],
        "x_labels": frame.x_labels(
            [f"{at:%H:%M}" if short else f"{at:%a} {at:%H}h" for at in starts], most=X_LABELS
        ),
        "series": series,
        "legend": [
            {"name": line.name, "colour": line.colour, "note": "dashed" if line.dashed else ""}
            for line in lines
        ],
        "rows": [
            {
                "at": at,
                "cells": [
                    None if line.values[index] is None else label(line.values[index])
                    for line in lines
                ],
            }
            for index, at in enumerate(starts)
        ],
        "has_data": any(series_["points"] for series_ in series),
    }


def _number(value: float, places: int = 2) -> str:
    """At most `places` decimals, without trailing zeros: 1.5, 0.25, 3."""
    return f"{value:.{places}f}".rstrip("0").rstrip(".") if places else f"{value:.0f}"


def _values(cells: list[VersionStats | None], read: Callable[[VersionStats], float | None]):
    return [None if cell is None else read(cell) for cell in cells]


def version_charts(
    *,
    series: VersionSeries,
    names: dict[int, str],
    metric: str,
    higher_is_better: bool,
    now: datetime,
) -> list[dict]:
    """The four charts of a deployment's live versions over `series`' windows; `names` gives
    each version id its label and its order (and so its colour, the same on every chart). The
    rate of a window still open at `now` is over its elapsed part."""
    minutes = [
        max(min(series.window, now - start).total_seconds(), 1) / 60 for start in series.starts
    ]
    versions = [
        (version_id, names.get(version_id, f"version {version_id}")) for version_id in names
    ]
    versions += [
        (version_id, f"version {version_id}")
        for version_id in sorted(series.stats)
        if version_id not in names
    ]
    empty = [None] * len(series.starts)
    cells = {version_id: series.stats.get(version_id, empty) for version_id, _name in versions}

    def lines(read, **kwargs):
        return [
            Line(name, charts.colour(index), _values(cells[version_id], read), **kwargs)
            for index, (version_id, name) in enumerate(versions)
        ]

    rate = [
        Line(
            name,
            charts.colour(index),
            [
                0.0 if cell is None else cell.requests / elapsed
                for cell, elapsed in zip(cells[version_id], minutes, strict=True)
            ],
        )
        for index, (version_id, name) in enumerate(versions)
    ]
    latency = [
        line
        for p99, p50 in zip(
            lines(lambda s: s.p99_ms), lines(lambda s: s.p50_ms, dashed=True), strict=True
        )
        for line in (
            Line(f"{p99.name} p99", p99.colour, p99.values),
            Line(f"{p50.name} p50", p50.colour, p50.values, dashed=True),
        )
    ]
    errors = lines(lambda s: s.error_rate * 100)
    live = lines(lambda s: s.metric)

    def peak(chart_lines):
        return max((v for line in chart_lines for v in line.values if v is not None), default=0)

    metric_ceiling = 1.0 if higher_is_better else nice_ceiling(peak(live), at_least=0.01)
    return [
        line_chart(
            key="rate",
            title="Requests per minute",
            starts=series.starts,
            lines=rate,
            ceiling=nice_ceiling(peak(rate), at_least=1),
            label=_number,
        ),
        line_chart(
            key="latency",
            title="Latency p99 and p50 (ms)",
            starts=series.starts,
            lines=latency,
            ceiling=nice_ceiling(peak(latency), at_least=10),
            label=lambda v: f"{_number(v)} ms",
        ),
        line_chart(
            key="errors",
            title="Error rate",
            starts=series.starts,
            lines=errors,
            ceiling=nice_ceiling(peak(errors), at_least=1),
            label=lambda v: f"{_number(v)}%",
        ),
        line_chart(
            key="metric",
            title=f"Live {metric} ({'higher' if higher_is_better else 'lower'} is better)",
            starts=series.starts,
            lines=live,
            ceiling=metric_ceiling,
            label=lambda v: _number(v, 3),
        ),
    ]


MAX_DRIFT_COLUMNS = len(charts.PALETTE) - 1  # the threshold line takes the grey


def drift_chart(*, reports: list, threshold: float) -> dict | None:
    """Each input column's distance over the drift reports (oldest first), one slot per report,
    with the column threshold as a dashed grey line; the columns that drifted most are drawn."""
    if not reports:
        return None
    ordered = sorted(reports, key=lambda report: report.window_end)
    peaks: dict[str, float] = {}
    for report in ordered:
        for name, column in report.columns.items():
            distance = _distance(column)
            if distance is not None:
                peaks[name] = max(peaks.get(name, 0.0), distance)
    shown = sorted(peaks, key=lambda name: (-peaks[name], name))[:MAX_DRIFT_COLUMNS]
    lines = [
        Line(
            name,
            charts.colour(index),
            [_distance(report.columns.get(name)) for report in ordered],
        )
        for index, name in enumerate(sorted(shown))
    ]
    lines.append(Line("threshold", charts.OTHER_COLOUR, [threshold] * len(ordered), dashed=True))
    chart = line_chart(
        key="drift",
        title="Distance per input column",
        starts=[report.window_end for report in ordered],
        lines=lines,
        ceiling=nice_ceiling(max([*peaks.values(), threshold]), at_least=0.01),
        label=lambda v: _number(v, 3),
    )
    chart["hidden"] = len(peaks) - len(shown)
    return chart


def _distance(column) -> float | None:
    distance = column.get("distance") if isinstance(column, dict) else None
    if isinstance(distance, (int, float)) and math.isfinite(distance):
        return float(distance)
    return None
