"""The shared chart geometry: exact positions for small inputs, ceilings, ticks, thinned labels,
lines broken at gaps and stacked bars. Pure functions: no database, no Django."""

import pytest

import charts
from charts import Frame, Label, Segment, Tick

# A 100 x 110 plot with nothing around it but 10 units of room on top: easy numbers.
SQUARE = Frame(width=100, height=110, top=10)


def test_the_frame_with_axes_leaves_room_for_labels_and_says_where_things_go():
    frame = charts.FRAME_WITH_AXES
    assert (frame.plot_width, frame.plot_height) == (416, 186)
    assert frame.context() == {
        "width": 480,
        "height": 220,
        "left": 56,
        "right": 472,
        "top": 10,
        "baseline": 196,
        "label_y": 214,
    }


@pytest.mark.parametrize(
    "value, at_least, ceiling",
    [
        (0, 100, 100),
        (100, 100, 100),
        (101, 100, 200),
        (201, 100, 500),
        (501, 100, 1000),
        (1_000_001, 100, 2_000_000),
        (0, 1, 1),
        (3, 1, 5),
        (7, 1, 10),
    ],
)
def test_nice_ceiling_is_the_next_one_two_or_five_times_a_power_of_ten(value, at_least, ceiling):
    assert charts.nice_ceiling(value, at_least=at_least) == ceiling


@pytest.mark.parametrize(
    "value, ceiling", [(0.0, 1.0), (0.99, 1.0), (1.0, 1.0), (1.01, 1.5), (1.5, 1.5), (2.2, 2.5)]
)
def test_step_ceiling_rounds_up_to_the_step_and_never_below_the_floor(value, ceiling):
    assert charts.step_ceiling(value, step=0.5, at_least=1.0) == ceiling


def test_y_scales_from_the_baseline_up_to_the_ceiling():
    assert SQUARE.baseline == 110
    assert [SQUARE.y(v, high=200) for v in (0, 50, 200, 300)] == [110.0, 85.0, 10.0, -40.0]
    # A scale that does not start at zero, and one with no span at all (a flat series).
    assert SQUARE.y(15, low=10, high=20) == 60.0
    assert SQUARE.y(2.0, low=2.0, high=2.0) == 110.0


def test_x_scales_across_the_plot_inside_the_margins():
    frame = Frame(width=120, height=10, left=15, right=5)
    assert [frame.x(step, low=10, high=20) for step in (10, 15, 20)] == [15.0, 65.0, 115.0]
    assert frame.x(7, low=7, high=7) == 15.0  # no span: the left edge


def test_positions_are_rounded_to_the_frames_places():
    assert Frame(width=1, height=1).x(1, low=0, high=3) == 0.33
    assert Frame(width=1, height=1, places=1).x(1, low=0, high=3) == 0.3


def test_y_ticks_step_from_zero_to_the_ceiling():
    assert SQUARE.y_ticks(ceiling=200, step=50) == [
        Tick(value=0, y=110.0),
        Tick(value=50, y=85.0),
        Tick(value=100, y=60.0),
        Tick(value=150, y=35.0),
        Tick(value=200, y=10.0),
    ]
    assert [t.value for t in SQUARE.y_ticks(ceiling=1.5, step=0.5)] == [0, 0.5, 1.0, 1.5]


def test_slots_share_the_plot_width_and_labels_sit_at_their_centres():
    assert SQUARE.slot_width(4) == 25.0
    assert SQUARE.slot_width(0) == 100.0  # no category: one empty slot, not a division by zero
    assert SQUARE.x_labels(["a", "b", "c", "d"], most=4) == [
        Label(x=12.5, text="a"),
        Label(x=37.5, text="b"),
        Label(x=62.5, text="c"),
        Label(x=87.5, text="d"),
    ]


@pytest.mark.parametrize(
    "count, most, shown",
    [
        (10, 5, [0, 2, 4, 6, 8]),
        (11, 5, [0, 3, 6, 9]),
        (5, 5, [0, 1, 2, 3, 4]),
        (24, 6, [0, 4, 8, 12, 16, 20]),
        (1, 6, [0]),
        (0, 6, []),
    ],
)
def test_x_labels_are_thinned_to_at_most_the_count_asked(count, most, shown):
    texts = [str(n) for n in range(count)]
    labels = SQUARE.x_labels(texts, most=most)
    assert [label.text for label in labels] == [str(n) for n in shown]
    assert len(labels) <= most


def test_a_gap_breaks_the_line_and_no_run_is_empty():
    points = [None, (1.0, 2.0), None, None, (3.0, 4.0), (5.5, 6.25), None]
    assert charts.polylines(points) == ["1.0,2.0", "3.0,4.0 5.5,6.25"]
    assert charts.polylines([(0.0, 1.0), (2.0, 3.0)]) == ["0.0,1.0 2.0,3.0"]
    assert charts.polylines([None, None]) == []
    assert charts.polylines([]) == []


def test_stacked_bars_pile_values_from_the_baseline_and_skip_zeros():
    frame = Frame(width=100, height=100)
    first, empty = frame.stacked_bars([[25, 0, 50], [0, 0, 0]], ceiling=100)
    # Two slots of 50; a bar fills 80% of its slot, centred in it.
    assert (first.x, first.width, empty.x, empty.width) == (5.0, 40.0, 55.0, 40.0)
    assert first.segments == [
        Segment(series=0, value=25, y=75.0, height=25.0),
        Segment(series=2, value=50, y=25.0, height=50.0),
    ]
    assert empty.segments == []


def test_a_crowded_bar_keeps_a_visible_width():
    bars = Frame(width=100, height=100).stacked_bars([[1]] * 1000, ceiling=1)
    assert {bar.width for bar in bars} == {0.5}


def test_colours_come_from_the_palette_in_order_and_repeat_past_it():
    assert [charts.colour(n) for n in range(3)] == ["#0072B2", "#E69F00", "#009E73"]
    assert charts.colour(len(charts.PALETTE)) == charts.colour(0)
    assert charts.OTHER_COLOUR not in charts.PALETTE


@pytest.mark.parametrize(
    ("low", "high", "bounds"),
    [
        (0.0, 1.0, (0.0, 1.0, 0.2)),
        (0.9, 2.1, (0.5, 2.5, 0.5)),
        (0.0012, 0.0031, (0.001, 0.0035, 0.0005)),
        (-3.0, 7.0, (-5.0, 10.0, 5.0)),  # on 2s it would take 6 steps
        (2.0, 2.0, (1.0, 3.0, 0.5)),  # flat: room around the value
        (0.0, 0.0, (-0.5, 0.5, 0.5)),
    ],
)
def test_nice_bounds_hold_the_values_on_round_steps(low, high, bounds):
    floor, ceiling, step = charts.nice_bounds(low, high, most=5)
    assert (floor, ceiling, step) == pytest.approx(bounds)
    assert floor <= low and ceiling >= high and round((ceiling - floor) / step) <= 5


def test_ticks_may_start_below_zero_and_read_with_the_steps_decimals():
    frame = Frame(width=100, height=50, top=10)
    ticks = frame.y_ticks(ceiling=0.3, step=0.1, low=-0.1)
    assert [charts.tick_text(t.value, step=0.1) for t in ticks] == [
        "-0.1",
        "0.0",
        "0.1",
        "0.2",
        "0.3",
    ]
    assert (ticks[0].y, ticks[-1].y) == (50, 10)
    assert charts.tick_text(1500.0, step=500) == "1500"


def test_x_ticks_label_round_whole_steps_inside_the_range():
    frame = Frame(width=110, height=50, left=10)
    assert [label.text for label in frame.x_ticks(low=3, high=97, most=5)] == [
        "20",
        "40",
        "60",
        "80",
    ]
    assert frame.x_ticks(low=0, high=2, most=6) == [
        Label(x=10, text="0"),
        Label(x=60, text="1"),
        Label(x=110, text="2"),
    ]
