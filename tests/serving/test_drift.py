"""The drift arithmetic (serving.drift) as pure functions: distances against hand-computed
values, windows drawn from the reference or shifted away from it, and what hostile callers send."""

import base64
import math

import numpy as np
import pytest

from registry.formats.profiling import QUANTILE_LEVELS, NumericSummary, TopValues
from serving import drift


def numeric_reference(values, *, quantiles=True):
    summary = NumericSummary(sample_size=10_000, seed=7)
    summary.add_array(np.asarray(values, dtype=np.float64))
    profile = summary.profile(nulls=0)
    if not quantiles:  # as profiles recorded before percentiles were kept
        profile.pop("quantiles")
    return profile


def categorical_reference(values):
    top = TopValues(1000)
    for value in values:
        top.add(value)
    return top.profile(count=len(values), nulls=0)


def test_wasserstein_of_two_small_samples_matches_the_hand_computed_area():
    # CDFs of {0, 1, 3} and {5, 6, 8}: every value moves by 5.
    assert drift.wasserstein_samples([0, 1, 3], [5, 6, 8]) == pytest.approx(5.0)
    # {0, 0} vs {1, 2}: |F1 - F2| is 1 on [0, 1] and 1/2 on [1, 2]: 1.5.
    assert drift.wasserstein_samples([0, 0], [1, 2]) == pytest.approx(1.5)
    # {0, 1, 2, 3} vs {0, 1}: |F1 - F2| is 1/4 on [0, 1], 1/2 on [1, 2], 1/4 on [2, 3].
    assert drift.wasserstein_samples([0, 1, 2, 3], [0, 1]) == pytest.approx(1.0)
    assert drift.wasserstein_samples([4, 2, 9], [9, 4, 2]) == 0.0


def test_wasserstein_to_a_linear_quantile_function_is_exact():
    # Reference uniform on [0, 1] (quantile function u); a sample of the single value 0.5:
    # integral of |u - 0.5| over [0, 1] = 1/4.
    levels = np.array([0.0, 1.0])
    knots = np.array([0.0, 1.0])
    assert drift.wasserstein_to_quantiles(levels, knots, [0.5]) == pytest.approx(0.25)
    # Uniform on [2, 3] against 0.5: every value lies above it, so W1 is the mean gap, 2.
    assert drift.wasserstein_to_quantiles(levels, knots + 2, [0.5]) == pytest.approx(2.0)
    # The midpoints of 4 equal bins: in each bin |u - midpoint| makes two triangles of area
    # 1/2 * 1/8 * 1/8, so 8 of them in all.
    assert drift.wasserstein_to_quantiles(
        levels, knots, [0.125, 0.375, 0.625, 0.875]
    ) == pytest.approx(8 * 0.5 * (1 / 8) * (1 / 8))


def test_js_distance_is_zero_for_identical_and_one_for_disjoint_distributions():
    assert drift.js_distance({"a": 3, "b": 1}, {"a": 30, "b": 10}) == pytest.approx(0.0)
    assert drift.js_distance({"a": 1}, {"b": 1}) == pytest.approx(1.0)
    # {a: 1} vs {a: 1/2, b: 1/2}: M = {3/4, 1/4}; JS = 1/2 log2(4/3) + 1/4 log2(2/3) + 1/4 log2 2.
    by_hand = 0.5 * math.log2(4 / 3) + 0.25 * math.log2(2 / 3) + 0.25
    assert drift.js_distance({"a": 1}, {"a": 1, "b": 1}) == pytest.approx(math.sqrt(by_hand))


def test_a_window_drawn_from_the_reference_does_not_drift():
    rng = np.random.default_rng(1)
    reference = {
        "age": numeric_reference(rng.normal(40, 12, 50_000)),
        "income": numeric_reference(rng.lognormal(10, 0.5, 50_000)),
        "city": categorical_reference(rng.choice(["a", "b", "c", "d"], 50_000).tolist()),
    }
    rows = [
        {"age": float(age), "income": float(income), "city": str(city)}
        for age, income, city in zip(
            rng.normal(40, 12, 1000),
            rng.lognormal(10, 0.5, 1000),
            rng.choice(["a", "b", "c", "d"], 1000),
            strict=True,
        )
    ]
    result = drift.compare_window(reference, rows)
    assert not result.drifted
    assert result.drifted_share == 0.0
    assert {name: column["method"] for name, column in result.columns.items()} == {
        "age": "wasserstein",
        "income": "wasserstein",
        "city": "jensen_shannon",
    }
    assert all(column["distance"] < 0.1 for column in result.columns.values())


def test_a_window_shifted_by_half_a_standard_deviation_drifts_by_about_that_much():
    rng = np.random.default_rng(2)
    reference = {
        "x": numeric_reference(rng.normal(0, 1, 50_000)),
        "y": numeric_reference(rng.normal(5, 2, 50_000)),
    }
    rows = [
        {"x": float(x), "y": float(y)}
        for x, y in zip(rng.normal(0.5, 1, 1000), rng.normal(6, 2, 1000), strict=True)
    ]
    result = drift.compare_window(reference, rows)
    assert result.drifted and result.drifted_share == 1.0
    assert result.columns["x"]["distance"] == pytest.approx(0.5, abs=0.06)
    assert result.columns["y"]["distance"] == pytest.approx(0.5, abs=0.06)


def test_old_profiles_without_quantiles_are_read_through_their_histogram():
    rng = np.random.default_rng(3)
    reference = numeric_reference(rng.normal(0, 1, 50_000), quantiles=False)
    same = drift.compare_column(reference, rng.normal(0, 1, 1000).tolist(), threshold=0.1)
    moved = drift.compare_column(reference, rng.normal(0.5, 1, 1000).tolist(), threshold=0.1)
    assert same["method"] == moved["method"] == "wasserstein_histogram"
    assert not same["drifted"]
    assert moved["drifted"] and moved["distance"] == pytest.approx(0.5, abs=0.07)


def test_a_new_category_counts_fully_against_a_complete_reference():
    reference = categorical_reference(["a"] * 50 + ["b"] * 50)
    result = drift.compare_column(reference, ["zzz"] * 100, threshold=0.1)
    assert result["distance"] == pytest.approx(1.0)
    assert result["drifted"]


def test_a_constant_reference_column_is_compared_by_the_share_equal_to_it():
    reference = numeric_reference([3.0] * 100)
    assert reference["std"] == 0.0
    unchanged = drift.compare_column(reference, [3] * 50, threshold=0.1)
    assert unchanged["method"] == "constant" and unchanged["distance"] == 0.0
    assert drift.compare_column(reference, [4] * 50, threshold=0.1)["distance"] == 1.0


def test_hostile_values_are_counted_as_missing_never_raised():
    rng = np.random.default_rng(4)
    reference = {
        "x": numeric_reference(rng.normal(0, 1, 5_000)),
        "city": categorical_reference(["a", "b"] * 100),
    }
    junk = [
        "12",
        "DROP TABLE",
        None,
        True,
        float("nan"),
        float("inf"),
        10**400,
        {"$gt": 1},
        [1, 2],
        "x" * 100_000,
    ]
    rows = [{"x": value, "city": value} for value in junk] + ["not an object", 7, None, []]
    result = drift.compare_window(reference, rows)
    assert result.columns["x"]["missing_share"] == 1.0
    assert result.columns["x"]["distance"] is None
    assert result.columns["x"]["drifted"]  # nothing usable came where numbers used to
    city = result.columns["city"]
    assert city["distance"] == pytest.approx(1.0)  # every usable value is one never seen
    assert 0 < city["missing_share"] < 1


def test_a_column_missing_from_the_window_drifts_and_extra_columns_are_ignored():
    rng = np.random.default_rng(5)
    reference = {
        "x": numeric_reference(rng.normal(0, 1, 5_000)),
        "y": numeric_reference(rng.normal(0, 1, 5_000)),
    }
    rows = [{"x": float(x), "surprise": "hello"} for x in rng.normal(0, 1, 500)]
    result = drift.compare_window(reference, rows)
    assert set(result.columns) == {"x", "y"}
    assert not result.columns["x"]["drifted"]
    assert result.columns["y"]["missing_share"] == 1.0 and result.columns["y"]["drifted"]
    assert result.drifted_share == 0.5 and result.drifted


def test_columns_the_monitor_cannot_compare_are_left_out():
    reference = {
        "when": {"count": 3, "nulls": 0, "min": "2024-01-01T00:00:00", "max": "2024-02-01"},
        "empty": {"count": 0, "nulls": 10, "non_finite": 0, "mean": None, "std": None},
        "not a column": 17,
    }
    result = drift.compare_window(reference, [{"when": "x"}])
    assert result.columns == {} and not result.drifted


def test_window_profiles_are_a_reference_for_later_windows():
    rng = np.random.default_rng(6)
    baseline = drift.numeric_profile([*rng.normal(0, 1, 1000).tolist(), "junk"])
    assert baseline["nulls"] == 1 and len(baseline["quantiles"]) == len(QUANTILE_LEVELS)
    moved = drift.compare_column(baseline, rng.normal(1, 1, 1000).tolist(), threshold=0.1)
    assert moved["drifted"]
    labels = drift.categorical_profile(["cat"] * 60 + ["dog"] * 40 + [None])
    assert labels["top"] == [["cat", 60], ["dog", 40]] and labels["nulls"] == 1
    same = drift.compare_column(labels, ["cat"] * 30 + ["dog"] * 20, threshold=0.1)
    assert same["distance"] == pytest.approx(0.0, abs=1e-6)


def test_numeric_profiles_keep_quantiles_from_minimum_to_maximum():
    profile = numeric_reference(np.arange(1001, dtype=np.float64))
    by_level = dict(zip(QUANTILE_LEVELS, profile["quantiles"], strict=True))
    assert by_level[0.0] == 0.0 and by_level[1.0] == 1000.0
    assert by_level[0.5] == pytest.approx(500.0) and by_level[0.001] == pytest.approx(1.0)


def test_a_damaged_reference_column_is_reported_not_raised():
    rng = np.random.default_rng(8)
    good = numeric_reference(rng.normal(0, 1, 1000))
    damaged = {**good, "quantiles": list(reversed(good["quantiles"]))}
    rows = [{"x": float(x), "y": 0.2} for x in rng.normal(0, 1, 1000)]
    result = drift.compare_window({"x": good, "y": damaged}, rows)
    assert result.columns["y"]["distance"] is None and "error" in result.columns["y"]
    assert set(result.columns) == {"x", "y"} and result.drifted_share == 0.0


def test_numbers_read_from_texts_series_and_images_survive_hostile_inputs():
    png = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + (640).to_bytes(4, "big")
    png += (480).to_bytes(4, "big") + b"\x08\x02\x00\x00\x00" + b"\x00" * 20
    names, rows = drift.input_features(
        "image-classifier",
        [
            {"image": base64.b64encode(png).decode()},
            {"image": "%%% not base64 %%%"},
            {"image": base64.b64encode(b"GIF89a").decode()},  # a header cut short
            {"image": 12},
            "not an object",
        ],
    )
    assert names == ("image.bytes", "image.width", "image.height")
    assert rows[0]["image.width"] == 640.0 and rows[0]["image.height"] == 480.0
    assert "image.width" not in rows[1] and "image.width" not in rows[2]
    assert rows[3] == {} and rows[4] == {}

    _names, rows = drift.input_features(
        "timeseries-forecaster",
        [{"history": [1, 2, 3]}, {"history": [1, "x", None]}, {"history": 10**400}, {}],
    )
    assert rows[0] == {
        "history.length": 3.0,
        "history.level": 2.0,
        "history.scale": 0.816496580927726,
    }
    assert rows[1] == {"history.length": 3.0} and rows[2] == {} and rows[3] == {}

    _names, rows = drift.input_features("text-classifier", [{"text": "two words"}, {"text": 5}])
    assert rows == [{"text.chars": 9.0, "text.words": 2.0}, {}]


def test_values_at_the_edge_of_the_float_range_drift_without_overflowing():
    rng = np.random.default_rng(9)
    reference = numeric_reference(rng.normal(0, 1, 1000))
    extreme = [1e308, -1e308, 1.7e308, -1.7e308] * 50
    result = drift.compare_column(reference, extreme, threshold=0.1)
    assert result["drifted"] and result["distance"] is None and result["overflow"]
    profile = drift.numeric_profile(extreme)
    assert all(math.isfinite(value) for value in profile["quantiles"])


def test_quantiles_of_another_count_are_read_as_evenly_spaced():
    # Uniform on [0, 1] as 11 evenly spaced quantiles; the window is the same uniform moved by
    # 0.1, one third of its standard deviation (sqrt(1/12)).
    reference = {"count": 1000, "nulls": 0, "mean": 0.5, "std": math.sqrt(1 / 12), "min": 0.0}
    reference.update(max=1.0, quantiles=[step / 10 for step in range(11)])
    window = (np.arange(10_000) / 10_000 + 0.1 + 0.5 / 10_000).tolist()
    result = drift.compare_column(reference, window, threshold=0.1)
    assert result["method"] == "wasserstein"
    assert result["distance"] == pytest.approx(0.1 / math.sqrt(1 / 12), rel=1e-3)
