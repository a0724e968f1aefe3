"""The job page's charts: one metric's values over its training steps, and the attempt's
utilization over its run time, each with a value axis, an x axis and each point's value on hover.
Drawn with the shared chart geometry (`charts`)."""

from __future__ import annotations

import math

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
    values = [value for _step, value in points]
    return _line_chart(
        name, points, bounds=(min(values), max(values)), x_unit="step", value_text=_value_text
    )


GIB = 1024**3
# (chart name, unit on its axis, the sample's value in that unit, or None where not read)
UTILIZATION_SERIES = (
    ("CPU cores used", "cores", lambda cpu, memory, gpu, gpu_memory: cpu),
    ("Memory", "GiB", lambda cpu, memory, gpu, gpu_memory: memory / GIB),
    ("GPU utilization", "%", lambda cpu, memory, gpu, gpu_memory: gpu),
    (
        "GPU memory",
        "GiB",
        lambda cpu, memory, gpu, gpu_memory: None if gpu_memory is None else gpu_memory / GIB,
    ),
)


def utilization_charts(samples: list[tuple]) -> list[dict]:
    """The attempt's CPU cores and memory (and on GPUs, utilization and the fullest GPU's
    memory) over its run, from 0, against seconds (minutes past ten) since the first sample;
    `samples` are (at, cpu_cores, memory_bytes, gpu_utilization, gpu_memory_bytes) rows. A series
    with fewer than two readings (a CPU slot's GPU series) is not drawn."""
    if len(samples) < 2:
        return []
    start = samples[0][0]
    offsets = [(row[0] - start).total_seconds() for row in samples]
    minutes = offsets[-1] >= 600
    xs = [offset / 60 if minutes else offset for offset in offsets]
    result = []
    for name, unit, value_of in UTILIZATION_SERIES:
        points = [
            (x, value)
            for x, row in zip(xs, samples, strict=True)
            if (value := value_of(*row[1:])) is not None
        ]
        if len(points) < 2:
            continue
        highest = max(value for _x, value in points)
        # A percentage is drawn on its whole scale; an idle series still gets a scale.
        ceiling = max(highest, 100.0) if unit == "%" else highest or 1.0
        result.append(
            _line_chart(
                name,
                points,
                bounds=(0, ceiling),
                x_unit="min" if minutes else "s",
                y_unit=unit,
                value_text=lambda value, unit=unit: f"{value:.3g} {unit}",
            )
        )
    return result


def _line_chart(
    name: str,
    points: list[tuple[float, float]],
    *,
    bounds: tuple[float, float],
    x_unit: str,
    value_text,
    y_unit: str | None = None,
) -> dict:
    frame = METRIC_FRAME
    steps = [step for step, _value in points]
    values = [value for _step, value in points]
    # Whole numbers at both ends, which the x labels sit on (run time in seconds is fractional).
    first, last = math.floor(min(steps)), math.ceil(max(steps))
    floor, ceiling, tick_step = charts.nice_bounds(*bounds, most=Y_TICKS)
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
                "step": steps[index] if isinstance(steps[index], int) else f"{steps[index]:.1f}",
                "label": value_text(values[index]),
            }
            for index in shown
        ],
        "ticks": [
            {"y": tick.y, "label": charts.tick_text(tick.value, step=tick_step)}
            for tick in frame.y_ticks(ceiling=ceiling, step=tick_step, low=floor)
        ],
        "x_labels": frame.x_ticks(low=first, high=last, most=X_LABELS),
        "x_unit": x_unit,
        "y_unit": y_unit or name,
        "min": min(values),
        "max": max(values),
        "last": values[-1],
    }
