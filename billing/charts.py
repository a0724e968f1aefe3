"""The usage page's stacked daily cost chart: the report's days and resources, drawn with the
shared chart geometry (`charts`)."""

from __future__ import annotations

import charts

from .money import money_format
from .reports import UsageDay

MAX_SERIES = len(charts.PALETTE)  # more resources than colours are drawn as one "other" series
OTHER = "other"
X_LABELS = 5
MIN_CEILING_MINOR = 100  # an empty or tiny range still has a scale up to 1.00


def _short_day(day) -> str:
    return f"{day:%b} {day.day}"


def stacked_daily_chart(*, daily: list[UsageDay], resources: list[str], currency: str) -> dict:
    """Bars per day, one segment per resource, scaled to the busiest day; legend and axes."""
    frame = charts.FRAME_WITH_AXES
    shown = resources[:MAX_SERIES]
    hidden = resources[MAX_SERIES:]
    series = [(name, charts.colour(i)) for i, name in enumerate(shown)]
    if hidden:
        series.append((OTHER, charts.OTHER_COLOUR))

    stacks = []
    for day in daily:
        amounts = [day.amounts.get(name, 0) for name in shown]
        if hidden:
            amounts.append(sum(day.amounts.get(name, 0) for name in hidden))
        stacks.append(amounts)
    totals = [sum(stack[index] for stack in stacks) for index in range(len(series))]

    ceiling = charts.nice_ceiling(
        max((day.total_minor for day in daily), default=0), at_least=MIN_CEILING_MINOR
    )
    bars = [
        {
            "day": day.day,
            "total_minor": day.total_minor,
            "x": bar.x,
            "width": bar.width,
            "segments": [
                {
                    "resource": series[segment.series][0],
                    "colour": series[segment.series][1],
                    "amount_minor": segment.value,
                    "y": segment.y,
                    "height": segment.height,
                }
                for segment in bar.segments
            ],
        }
        for day, bar in zip(daily, frame.stacked_bars(stacks, ceiling=ceiling), strict=True)
    ]
    # Ceilings are 1, 2 or 5 times a power of ten from 100 up, so quarters stay whole cents.
    ticks = [
        {"amount_minor": tick.value, "y": tick.y, "label": money_format(tick.value, currency)}
        for tick in frame.y_ticks(ceiling=ceiling, step=ceiling // 4)
    ]
    busiest = max(daily, key=lambda day: day.total_minor, default=None)
    return {
        **frame.context(),
        "bars": bars,
        "ticks": ticks,
        "x_labels": frame.x_labels([_short_day(day.day) for day in daily], most=X_LABELS),
        "legend": [
            {
                "name": name,
                "colour": colour,
                "amount_minor": total,
                "note": money_format(total, currency),
            }
            for (name, colour), total in zip(series, totals, strict=True)
        ],
        "busiest": busiest if busiest is not None and busiest.total_minor else None,
    }
