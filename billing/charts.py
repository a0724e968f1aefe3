"""Geometry of the usage page's stacked daily cost chart, drawn as inline SVG on the server.

Figures stay integer minor units; floats appear only as pixel positions.
"""

from __future__ import annotations

from .reports import UsageDay

WIDTH, HEIGHT = 480, 220
LEFT, RIGHT, TOP, BOTTOM = 56, 8, 10, 24  # room for the amount and date labels
MAX_SERIES = 7  # more resources than this are drawn as one "other" series
OTHER = "other"
# Okabe-Ito: told apart by people with the common colour-vision deficiencies.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442"]
OTHER_COLOUR = "#8a8a8a"
X_LABELS = 5


def _nice_ceiling(amount_minor: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten at or above the amount (at least 1.00)."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= max(amount_minor, 100):
                return step * factor
        step *= 10


def _short_day(day) -> str:
    return f"{day:%b} {day.day}"


def stacked_daily_chart(*, daily: list[UsageDay], resources: list[str]) -> dict:
    """Bars per day, one segment per resource, scaled to the busiest day; legend and axes."""
    shown = resources[:MAX_SERIES]
    hidden = resources[MAX_SERIES:]
    series = [(name, PALETTE[i]) for i, name in enumerate(shown)]
    if hidden:
        series.append((OTHER, OTHER_COLOUR))
    totals = {name: 0 for name, _ in series}

    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    ceiling = _nice_ceiling(max((day.total_minor for day in daily), default=0))
    slot = plot_w / max(len(daily), 1)
    bar_w = max(slot * 0.8, 0.5)
    bars = []
    for index, day in enumerate(daily):
        amounts = {name: day.amounts.get(name, 0) for name in shown}
        if hidden:
            amounts[OTHER] = sum(day.amounts.get(name, 0) for name in hidden)
        x = LEFT + index * slot + (slot - bar_w) / 2
        baseline = TOP + plot_h
        segments = []
        for name, colour in series:
            amount = amounts[name]
            totals[name] += amount
            if not amount:
                continue
            height = amount / ceiling * plot_h
            baseline -= height
            segments.append(
                {
                    "resource": name,
                    "colour": colour,
                    "amount_minor": amount,
                    "y": round(baseline, 2),
                    "height": round(height, 2),
                }
            )
        bars.append(
            {
                "day": day.day,
                "total_minor": day.total_minor,
                "x": round(x, 2),
                "width": round(bar_w, 2),
                "segments": segments,
            }
        )

    ticks = [
        {"amount_minor": ceiling * step // 4, "y": round(TOP + plot_h * (1 - step / 4), 2)}
        for step in range(5)
    ]
    every = max(1, -(-len(daily) // X_LABELS))
    x_labels = [
        {"x": round(LEFT + index * slot + slot / 2, 2), "label": _short_day(day.day)}
        for index, day in enumerate(daily)
        if index % every == 0
    ]
    busiest = max(daily, key=lambda day: day.total_minor, default=None)
    return {
        "width": WIDTH,
        "height": HEIGHT,
        "left": LEFT,
        "right": WIDTH - RIGHT,
        "top": TOP,
        "baseline": TOP + plot_h,
        "label_y": HEIGHT - 6,
        "bars": bars,
        "ticks": ticks,
        "x_labels": x_labels,
        "legend": [
            {"resource": name, "colour": colour, "amount_minor": totals[name]}
            for name, colour in series
        ],
        "busiest": busiest if busiest is not None and busiest.total_minor else None,
    }
