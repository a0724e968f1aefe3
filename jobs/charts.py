"""The job page's metric charts: one metric's values over its training steps, with a value axis,
a step axis and each point's value on hover. Drawn with the shared chart geometry (`charts`)."""

from __future__ import annotations

import charts

# The dashboard's frame, with room above the plot for the value axis' name and, on the right,
# for half of the last step's label, which sits on the plot's edge.
METRIC_FRAME = charts.Frame(width=480, height=220, left=56, right=20, top=22, bottom=24)
Y_TICKS = 5  # at most this many steps between grid lines
X_LABELS = 6
# Points that carry a hover value: a long run (thousands of steps, refreshed every 2 s) keeps
# its whole line but gives a value to every n-th point only, and always to the last.
HOVER_POINTS = 120


def _value_text(value: float) -> str:
    return f"{value:.4g}"


def metric_chart(name: str, points: list[tuple[int, float]]) -> dict | None:
    """`name`'s values over its steps, on a round scale around its lowest and highest value;
    None for fewer than two points (no line to draw)."""
    if len(points) < 2:
        return None
    frame = METRIC_FRAME
    steps = [step for step, _value in points]
    values = [value for _step, value in points]
    first, last = min(steps), max(steps)
    floor, ceiling, tick_step = charts.nice_bounds(min(values), max(values), most=Y_TICKS)
    positions = [
        (frame.x(step, low=first, high=last), frame.y(value, low=floor, high=ceiling))
        for step, value in points
    ]
    [line] = charts.polylines(positions)
    every = -(-len(points) // HOVER_POINTS)
    shown = [*range(0, len(points) - 1, every), len(points) - 1]
    return {
        **frame.context(),
        "name": name,
        "points": line,
        "hover": [
            {
                "x": positions[index][0],
                "y": positions[index][1],
                "step": steps[index],
                "label": _value_text(values[index]),
            }
            for index in shown
        ],
        "ticks": [
            {"y": tick.y, "label": charts.tick_text(tick.value, step=tick_step)}
            for tick in frame.y_ticks(ceiling=ceiling, step=tick_step, low=floor)
        ],
        "x_labels": frame.x_ticks(low=first, high=last, most=X_LABELS),
        "x_unit": "step",
        "y_unit": name,
        "min": min(values),
        "max": max(values),
        "last": values[-1],
    }
