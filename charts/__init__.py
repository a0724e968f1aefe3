"""Geometry of the charts the pages draw as inline SVG on the server, with no chart library.

Pure Python, below every app (no Django, no app import): each chart's adapter, next to its data,
turns rows into these shapes, and the partials under templates/charts/ draw the axes and the
legend. Values stay what they are (money in integer minor units); floats appear only as pixel
positions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# Okabe-Ito: told apart by people with the common colour-vision deficiencies.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442")
# For a series that gathers the rest: a grey no palette colour is mistaken for.
OTHER_COLOUR = "#8a8a8a"
LABEL_RISE = 6  # the x labels' baseline sits this far above the frame's bottom edge


def colour(index: int) -> str:
    """The index-th series' colour, the palette repeating past its end."""
    return PALETTE[index % len(PALETTE)]


def nice_ceiling(value: int, *, at_least: int = 1) -> int:
    """The smallest 1, 2 or 5 times a power of ten at or above both `value` and `at_least`."""
    target = max(value, at_least)
    power = 1
    while True:
        for factor in (1, 2, 5):
            if power * factor >= target:
                return power * factor
        power *= 10


def step_ceiling(value: float, *, step: float, at_least: float) -> float:
    """The smallest multiple of `step` at or above `value`, and not below `at_least`."""
    return max(at_least, math.ceil(value / step) * step)


def nice_step(span: float, *, most: int) -> float:
    """The smallest 1, 2 or 5 times a power of ten (which may be below 1) that cuts `span` into
    at most `most` steps."""
    power = 10.0 ** math.floor(math.log10(span / most))
    return next(f * power for f in (1, 2, 5, 10) if span / (f * power) <= most * (1 + 1e-9))


def nice_bounds(low: float, high: float, *, most: int) -> tuple[float, float, float]:
    """A scale holding `low`..`high` whose ends are multiples of a round step, at most `most`
    steps apart: (floor, ceiling, step). For values that need not start at 0 (a loss falling
    from 0.9 to 0.2); a flat series gets room around its value, so it is drawn mid-height."""
    if high == low:
        half = abs(low) / 2 or 0.5
        low, high = low - half, high + half
    step = nice_step(high - low, most=most)
    while True:
        floor, ceiling = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
        if ceiling - floor <= most:
            return floor * step, ceiling * step, step
        step = nice_step(step * most * 1.01, most=most)


def tick_text(value: float, *, step: float) -> str:
    """`value` with as many decimals as `step` needs: ticks every 0.05 read 0.10, 0.15, not 0.1,
    0.15000000000000002."""
    places = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{value:.{places}f}"


def polylines(points: Sequence[tuple[float, float] | None]) -> list[str]:
    """SVG `points` lists, one per run of known points: a None (no value there) breaks the line
    instead of drawing it through a made-up value."""
    runs: list[list[str]] = [[]]
    for point in points:
        if point is None:
            if runs[-1]:
                runs.append([])
            continue
        runs[-1].append(f"{point[0]},{point[1]}")
    return [" ".join(run) for run in runs if run]


@dataclass(frozen=True)
class Tick:
    value: float
    y: float


@dataclass(frozen=True)
class Label:
    x: float
    text: str


@dataclass(frozen=True)
class Segment:
    series: int  # the value's index in its stack
    value: float
    y: float
    height: float


@dataclass(frozen=True)
class Bar:
    x: float
    width: float
    segments: list[Segment]


@dataclass(frozen=True)
class Frame:
    """An SVG viewBox: the plot area inside margins that leave room for the axis labels.

    Values grow upward from the baseline. Positions are rounded to `places` decimals: finer than
    the eye sees, without long floats in the page.
    """

    width: int
    height: int
    left: int = 0
    right: int = 0
    top: int = 0
    bottom: int = 0
    places: int = 2

    @property
    def plot_width(self) -> int:
        return self.width - self.left - self.right

    @property
    def plot_height(self) -> int:
        return self.height - self.top - self.bottom

    @property
    def plot_right(self) -> int:
        return self.width - self.right

    @property
    def baseline(self) -> int:
        return self.top + self.plot_height

    @property
    def label_y(self) -> int:
        return self.height - LABEL_RISE

    def context(self) -> dict:
        """What the templates need of the frame: the viewBox, the plot's edges, the label row."""
        return {
            "width": self.width,
            "height": self.height,
            "left": self.left,
            "right": self.plot_right,
            "top": self.top,
            "baseline": self.baseline,
            "label_y": self.label_y,
        }

    def px(self, position: float) -> float:
        return round(position, self.places)

    def x(self, value: float, *, low: float, high: float) -> float:
        """Where `value` lies on a scale from `low` (the plot's left edge) to `high` (its right);
        a scale with no span puts everything on the left edge."""
        span = (high - low) or 1
        return self.px(self.left + (value - low) / span * self.plot_width)

    def y(self, value: float, *, high: float, low: float = 0) -> float:
        """Where `value` lies on a scale from `low` (the baseline) up to `high` (the plot's top)."""
        span = (high - low) or 1
        return self.px(self.top + self.plot_height * (1 - (value - low) / span))

    def slot_width(self, count: int) -> float:
        """The plot's width shared by `count` categories (days, hours) side by side."""
        return self.plot_width / max(count, 1)

    def slot_centre(self, index: int, count: int) -> float:
        slot = self.slot_width(count)
        return self.px(self.left + index * slot + slot / 2)

    def y_ticks(self, *, ceiling: float, step: float, low: float = 0) -> list[Tick]:
        """Grid lines from `low` (0 unless told) up to `ceiling`, every `step` (which divides
        the span)."""
        return [
            Tick(value=low + step * n, y=self.y(low + step * n, high=ceiling, low=low))
            for n in range(round((ceiling - low) / step) + 1)
        ]

    def x_ticks(self, *, low: int, high: int, most: int) -> list[Label]:
        """Labels at the round whole numbers (training steps) on a scale from `low` to `high`,
        at most `most` + 1 of them."""
        step = max(1, round(nice_step((high - low) or 1, most=most)))
        first = -(-low // step) * step
        return [
            Label(x=self.x(value, low=low, high=high), text=str(value))
            for value in range(first, high + 1, step)
        ]

    def x_labels(self, texts: Sequence[str], *, most: int) -> list[Label]:
        """The slots' labels, every n-th one, n the smallest that shows at most `most`."""
        every = max(1, -(-len(texts) // most))
        return [
            Label(x=self.slot_centre(index, len(texts)), text=text)
            for index, text in enumerate(texts)
            if index % every == 0
        ]

    def stacked_bars(
        self,
        stacks: Sequence[Sequence[float]],
        *,
        ceiling: float,
        fill: float = 0.8,
        min_width: float = 0.5,
    ) -> list[Bar]:
        """One bar per slot, its values stacked up from the baseline in order; a zero value
        draws no segment. A bar fills `fill` of its slot, and never less than `min_width`."""
        slot = self.slot_width(len(stacks))
        width = max(slot * fill, min_width)
        bars = []
        for index, values in enumerate(stacks):
            top = self.baseline
            segments = []
            for series, value in enumerate(values):
                if not value:
                    continue
                height = value / ceiling * self.plot_height
                top -= height
                segments.append(
                    Segment(series=series, value=value, y=self.px(top), height=self.px(height))
                )
            bars.append(
                Bar(
                    x=self.px(self.left + index * slot + (slot - width) / 2),
                    width=self.px(width),
                    segments=segments,
                )
            )
        return bars


# The dashboard's charts with axes: room on the left for the values, below for the dates.
FRAME_WITH_AXES = Frame(width=480, height=220, left=56, right=8, top=10, bottom=24)
