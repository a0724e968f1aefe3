"""The overview's utilization chart: one line per resource class, drawn with the shared chart
geometry (`charts`)."""

from __future__ import annotations

from datetime import timedelta

from django.template.defaultfilters import floatformat, pluralize

import charts
from jobs.selectors import PoolUtilization

X_LABELS = 6


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else round(fraction * 100, 1)


def _legend_note(capacity_slots: int, mean: float | None, peak: float | None) -> str:
    note = f"{capacity_slots} slot{pluralize(capacity_slots)}"
    if mean is None:
        return note
    return f"{note}, avg {floatformat(mean, '-1')}%, peak {floatformat(peak, '-1')}%"


def utilization_chart(utilization: PoolUtilization) -> dict:
    """Geometry of one line per resource class (share of slots busy per bucket), as inline SVG.

    The scale reaches 100%, or further when today's smaller capacity makes a past bucket exceed
    it; a bucket with no capacity or still in the future breaks the line instead of reading 0.
    """
    frame = charts.FRAME_WITH_AXES
    buckets = utilization.buckets
    peak = max((c.peak for c in utilization.classes if c.peak is not None), default=0.0)
    # Up to a full pool in quarters; past it (capacity shrank since), in halves.
    ceiling = charts.step_ceiling(peak, step=0.5, at_least=1.0)
    tick_step = 0.25 if ceiling <= 1.0 else 0.5

    series = []
    for number, row in enumerate(utilization.classes):
        line: list[tuple[float, float] | None] = []
        points = []
        for index, fraction in enumerate(row.fractions):
            if fraction is None:
                line.append(None)
                continue
            x, y = frame.slot_centre(index, len(buckets)), frame.y(fraction, high=ceiling)
            line.append((x, y))
            points.append({"x": x, "y": y, "at": buckets[index], "percent": _percent(fraction)})
        series.append(
            {
                "resource_class": row.resource_class,
                "colour": charts.colour(number),
                "capacity_slots": row.capacity_slots,
                "lines": charts.polylines(line),
                "points": points,
                "mean_percent": _percent(row.mean),
                "peak_percent": _percent(row.peak),
            }
        )

    hourly = utilization.bucket < timedelta(days=1)
    return {
        **frame.context(),
        "ticks": [
            {
                "percent": round(tick.value * 100),
                "y": tick.y,
                "label": f"{round(tick.value * 100)}%",
            }
            for tick in frame.y_ticks(ceiling=ceiling, step=tick_step)
        ],
        "x_labels": frame.x_labels(
            [f"{at:%H:%M}" if hourly else f"{at:%b} {at.day}" for at in buckets], most=X_LABELS
        ),
        "series": series,
        "legend": [
            {
                "name": s["resource_class"],
                "colour": s["colour"],
                "note": _legend_note(s["capacity_slots"], s["mean_percent"], s["peak_percent"]),
            }
            for s in series
        ],
        "rows": [
            {"at": at, "percents": [_percent(row.fractions[index]) for row in utilization.classes]}
            for index, at in enumerate(buckets)
        ],
    }
