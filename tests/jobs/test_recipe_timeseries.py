"""The time-series forecaster recipe in-process on the CPU: parameters, the seasonal-naive
baseline, training on the sample series, determinism, exact resumption, evaluation, forecasting
and bad input."""

import csv
import json
import math
import random
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.recipes.base import (
    RecipeContext,
    RecipeInputError,
    RecipeParameterError,
    load_checkpoint,
    validate_parameters,
)
from jobs.recipes.timeseries import TimeSeriesForecaster, _seasonal_naive_index
from jobs.samples.timeseries import write_timeseries_sample
from tests.jobs.recipe_helpers import (
    StopAfterStep,
    assert_same_weights,
    events,
    one_torch_thread,
    read_csv,
    recipe_context,
    weights,
)

REPO = Path(__file__).resolve().parents[2]
FAST = {"window": 24, "horizon": 6, "epochs": 6, "hidden_size": 32, "learning_rate": 0.005}
GRU = FAST | {"model": "gru", "hidden_size": 8, "epochs": 2}
# The 720-point sample: 144 points for validation, 576 for training: 547 windows, 9 batches.
BATCHES = 9


def make_context(
    workdir: Path, dataset: Path, parameters: dict, cls: type = RecipeContext, **overrides
) -> RecipeContext:
    settings = {"seed": 5} | overrides
    return recipe_context(TimeSeriesForecaster, workdir, dataset, parameters, cls, **settings)


def logs(ctx: RecipeContext) -> str:
    return "\n".join(line for line in ctx.emit if not line.startswith("@@"))


def write_rows(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(autouse=True, scope="module")
def _like_the_child():
    """One thread (these models are tiny, the machine is shared) and, as the child does on the
    CPU, deterministic algorithms only."""
    with one_torch_thread(deterministic=True):
        yield


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "hourly.csv"
    write_timeseries_sample(path, points=24 * 30, seed=1)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset) -> RecipeContext:
    """A model trained on the sample, for the tests that only read it."""
    workdir = tmp_path_factory.mktemp("trained")
    ctx = make_context(workdir, dataset, FAST)
    ctx.result = TimeSeriesForecaster().train(ctx)
    return ctx


# Parameters


def test_validation_fills_the_defaults_and_one_series_needs_no_series_column():
    assert validate_parameters(TimeSeriesForecaster, {}) == {
        "timestamp_column": "timestamp",
        "value_column": "value",
        "window": 48,
        "horizon": 12,
        "season_length": 24,
        "model": "mlp",
        "hidden_size": 64,
        "epochs": 30,
        "batch_size": 64,
        "learning_rate": 0.001,
        "validation_fraction": 0.2,
        "early_stopping_patience": 5,
    }


@pytest.mark.parametrize(
    ("parameters", "field", "message"),
    [
        ({"window": "48"}, "parameters.window", "Must be a whole number."),
        ({"horizon": 0}, "parameters.horizon", "Must be at least 1."),
        ({"season_length": 1.5}, "parameters.season_length", "Must be a whole number."),
        ({"model": "arima"}, "parameters.model", "Must be one of: mlp, gru."),
        ({"validation_fraction": 0.9}, "parameters.validation_fraction", "Must be at most 0.5."),
        ({"series_column": ""}, "parameters.series_column", "Must not be empty."),
        ({"value_column": 3}, "parameters.value_column", "Must be text."),
    ],
)
def test_wrong_values_name_the_field_and_the_rule(parameters, field, message):
    with pytest.raises(RecipeParameterError) as caught:
        validate_parameters(TimeSeriesForecaster, parameters)
    assert caught.value.fields == {field: [message]}


def test_unknown_parameter_is_rejected_by_name():
    with pytest.raises(RecipeParameterError) as caught:
        validate_parameters(TimeSeriesForecaster, {"lookback": 48})
    assert list(caught.value.fields) == ["parameters.lookback"]


@pytest.mark.slow
def test_importing_the_recipe_and_validating_does_not_import_torch():
    probe = textwrap.dedent(
        """
        import sys
        from jobs.recipes.base import validate_parameters
        from jobs.recipes.timeseries import TimeSeriesForecaster
        import jobs.samples.timeseries
        validate_parameters(TimeSeriesForecaster, {"window": 24})
        heavy = sorted(name for name in ("torch", "pyarrow", "safetensors") if name in sys.modules)
        print(",".join(heavy))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert run.stdout.strip() == ""


# The seasonal-naive baseline


def test_seasonal_naive_reads_the_same_moment_one_or_more_seasons_back():
    # A window of 3 starting at 10 ends at t = 12; steps 1..6 with a season of 4.
    index = _seasonal_naive_index(torch.tensor([10]), window=3, horizon=6, season=4)
    assert index.tolist() == [[9, 10, 11, 12, 9, 10]]


def test_a_purely_seasonal_series_has_no_seasonal_naive_error(tmp_path):
    start = datetime(2024, 1, 1)
    rows = [
        [(start + timedelta(hours=h)).isoformat(), 10 + math.sin(2 * math.pi * h / 24)]
        for h in range(24 * 12)
    ]
    path = write_rows(tmp_path / "periodic.csv", ["timestamp", "value"], rows)
    result = TimeSeriesForecaster().train(make_context(tmp_path, path, FAST | {"epochs": 1}))
    assert result.metrics["val_mae_seasonal_naive"] == pytest.approx(0, abs=1e-9)
    assert result.metrics["val_mape_seasonal_naive"] == pytest.approx(0, abs=1e-9)


# Training


def test_training_on_the_sample_beats_the_seasonal_naive_forecast(trained):
    metrics = trained.result.metrics
    assert metrics["val_mae"] < metrics["val_mae_seasonal_naive"]
    assert metrics["val_mape"] < metrics["val_mape_seasonal_naive"]
    assert metrics["series"] == 1 and metrics["val_windows"] == 144 - 6 + 1
    names = {(metric["split"], metric["name"]) for metric in events(trained, "metric")}
    assert names == {
        ("train", "loss"),
        ("val", "loss"),
        ("val", "mae"),
        ("val", "mape"),
        ("val", "mae_seasonal_naive"),
        ("val", "mape_seasonal_naive"),
    }
    assert events(trained, "progress")[0] == {"step": 1, "total": 6 * BATCHES, "epoch": 1}


def test_artifacts_are_safetensors_and_a_config_with_the_scaling(trained):
    assert trained.result.artifacts == {
        "model.safetensors": "out/model.safetensors",
        "config.json": "out/config.json",
    }
    config = json.loads((trained.output_dir / "config.json").read_text())
    assert config["architecture"] == {"model": "mlp", "window": 24, "horizon": 6, "hidden_size": 32}
    [series] = config["series"]
    assert series["series"] is None and series["training_points"] == 576
    assert 40 < series["mean"] < 70 and series["std"] > 1
    assert weights(trained)["mlp.0.weight"].shape == (32, 24)


def test_same_seed_gives_identical_weights_and_another_seed_does_not(tmp_path, dataset, trained):
    again = make_context(tmp_path / "again", dataset, FAST)
    TimeSeriesForecaster().train(again)
    assert_same_weights(weights(trained), weights(again))
    other = make_context(tmp_path / "other", dataset, FAST, seed=6)
    TimeSeriesForecaster().train(other)
    assert not torch.equal(weights(trained)["mlp.0.weight"], weights(other)["mlp.0.weight"])


def test_rows_in_any_order_and_parquet_timestamps_train_the_same_model(tmp_path, dataset, trained):
    rows = read_csv(dataset)
    random.Random(0).shuffle(rows)  # noqa: S311 (test data)
    table = pa.table(
        {
            "timestamp": pa.array([datetime.fromisoformat(r["timestamp"]) for r in rows]),
            "value": pa.array([float(r["value"]) for r in rows]),
        }
    )
    path = tmp_path / "shuffled.parquet"
    pq.write_table(table, path)
    ctx = make_context(tmp_path, path, FAST)
    TimeSeriesForecaster().train(ctx)
    assert_same_weights(weights(trained), weights(ctx))


@pytest.mark.parametrize(
    ("parameters", "stops"),
    [
        pytest.param(FAST, [5], id="mlp-mid-epoch"),
        pytest.param(FAST, [BATCHES, 3 * BATCHES + 2], id="mlp-twice"),
        pytest.param(GRU, [BATCHES + 4], id="gru"),
    ],
)
def test_interrupted_and_resumed_run_ends_with_identical_weights(
    tmp_path, dataset, parameters, stops
):
    uninterrupted = make_context(tmp_path / "whole", dataset, parameters)
    expected = TimeSeriesForecaster().train(uninterrupted)

    workdir, resume_state = tmp_path / "pieces", None
    for stop_at in stops:
        ctx = make_context(
            workdir, dataset, parameters, StopAfterStep, resume_state=resume_state, stop_at=stop_at
        )
        assert TimeSeriesForecaster().train(ctx) is None
        [checkpoint] = events(ctx, "checkpoint")
        assert checkpoint["step"] == stop_at
        resume_state = load_checkpoint(workdir / checkpoint["path"])
    ctx = make_context(workdir, dataset, parameters, resume_state=resume_state)
    result = TimeSeriesForecaster().train(ctx)

    assert_same_weights(weights(uninterrupted), weights(ctx))
    assert result.metrics == expected.metrics


def test_checkpoint_of_another_run_is_refused(tmp_path, dataset):
    ctx = make_context(tmp_path, dataset, FAST, StopAfterStep, stop_at=2)
    TimeSeriesForecaster().train(ctx)
    state = load_checkpoint(tmp_path / events(ctx, "checkpoint")[-1]["path"])
    other = make_context(tmp_path, dataset, FAST | {"season_length": 12}, resume_state=state)
    with pytest.raises(RecipeInputError, match="checkpoint belongs to a run with other"):
        TimeSeriesForecaster().train(other)


def two_stores(tmp_path: Path) -> list[list]:
    """(store, timestamp, value) rows of two 15-day samples, the south's ten times the north's."""
    rows = []
    for name, scale, seed in (("north", 1.0, 1), ("south", 10.0, 2)):
        write_timeseries_sample(tmp_path / f"{name}.csv", points=24 * 15, seed=seed)
        for row in read_csv(tmp_path / f"{name}.csv"):
            rows.append([name, row["timestamp"], float(row["value"]) * scale])
    return rows


def test_several_series_train_together_each_scaled_by_its_own_training_part(tmp_path):
    rows = [*two_stores(tmp_path), ["tiny", "2024-01-01T00:00:00", 1.0]]
    path = write_rows(tmp_path / "stores.csv", ["store", "timestamp", "value"], rows)
    ctx = make_context(tmp_path, path, FAST | {"series_column": "store"})
    result = TimeSeriesForecaster().train(ctx)

    assert result.metrics["series"] == 2
    assert "series 'tiny' has 1 points" in logs(ctx).lower()
    config = json.loads((ctx.output_dir / "config.json").read_text())
    north, south = config["series"]
    assert (north["series"], south["series"]) == ("north", "south")
    assert south["mean"] == pytest.approx(10 * north["mean"], rel=0.05)
    assert result.metrics["val_mae"] < result.metrics["val_mae_seasonal_naive"]


# Evaluation and forecasting


def test_evaluate_compares_with_seasonal_naive_on_a_fresh_stretch(tmp_path, trained):
    fresh = tmp_path / "fresh.csv"
    write_timeseries_sample(fresh, points=24 * 10, seed=9)
    metrics = TimeSeriesForecaster().evaluate(
        make_context(tmp_path, fresh, FAST, model_dir=trained.output_dir)
    )
    assert metrics["windows"] == 24 * 10 - 24 - 6 + 1 and metrics["series"] == 1
    assert metrics["mae"] < metrics["mae_seasonal_naive"]


def test_the_gate_scores_the_validation_windows_the_training_run_reports(tmp_path):
    """The gate's MAE over the validation windows is the run's own val_mae (its validation part
    is the end of every series, whatever the seed), each window sliced by its series; a model
    trained on other data is scored on the same windows, scaling a series it never saw by that
    series' training part."""
    rows = two_stores(tmp_path)
    path = write_rows(tmp_path / "stores.csv", ["store", "timestamp", "value"], rows)
    parameters = FAST | {"series_column": "store"}
    ctx = make_context(tmp_path / "run", path, parameters)
    result = TimeSeriesForecaster().train(ctx)
    north = write_rows(
        tmp_path / "north-only.csv", ["timestamp", "value"], [row[1:] for row in rows[:360]]
    )
    other = make_context(tmp_path / "other", north, FAST | {"epochs": 1}, seed=9)
    TimeSeriesForecaster().train(other)

    outcomes, slices = TimeSeriesForecaster().validation_outcomes(
        ctx,
        model_dirs={"challenger": ctx.output_dir, "champion": other.output_dir},
        split_seed=0,
        slice_column="series",
    )
    errors = outcomes["challenger"]
    assert len(errors) == len(slices) == result.metrics["val_windows"]
    assert math.fsum(errors) / len(errors) == pytest.approx(result.metrics["val_mae"])
    assert set(slices) == {"north", "south"}
    assert len(outcomes["champion"]) == len(errors) and outcomes["champion"] != errors
    assert "series 'north' was not in the training data" in logs(ctx).lower()
    _, unsliced = TimeSeriesForecaster().validation_outcomes(
        ctx, model_dirs={}, split_seed=0, slice_column=""
    )
    assert set(unsliced) == {None}


def test_the_gate_refuses_a_champion_of_another_horizon(tmp_path, dataset, trained):
    ctx = make_context(tmp_path, dataset, FAST | {"horizon": 3})
    with pytest.raises(RecipeInputError, match="forecasts 6 points ahead, the data's"):
        TimeSeriesForecaster().validation_outcomes(
            ctx, model_dirs={"champion": trained.output_dir}, split_seed=0, slice_column=""
        )


def test_predict_forecasts_the_horizon_after_the_last_point(tmp_path, trained):
    rows = read_csv(trained.dataset_path)
    random.Random(1).shuffle(rows)  # noqa: S311 (test data)
    path = write_rows(
        tmp_path / "history.csv",
        ["timestamp", "value"],
        [[r["timestamp"], r["value"]] for r in rows],
    )
    ctx = make_context(tmp_path, path, FAST, model_dir=trained.output_dir)
    ctx.chunk_rows = 50  # the last points come from many chunks, out of order
    result = TimeSeriesForecaster().predict(ctx)

    assert result.metrics == {"rows": 6, "series": 1}
    assert result.artifacts == {"predictions.csv": "out/predictions.csv"}
    forecast = read_csv(tmp_path / "out" / "predictions.csv")
    assert list(forecast[0]) == ["step", "timestamp", "prediction"]
    assert [row["step"] for row in forecast] == ["1", "2", "3", "4", "5", "6"]
    last = datetime(2024, 1, 1) + timedelta(hours=24 * 30 - 1)
    assert [row["timestamp"] for row in forecast] == [
        (last + timedelta(hours=step)).isoformat() for step in range(1, 7)
    ]
    # The sample's next hours: its level then, give or take the daily cycle and the noise.
    assert all(40 < float(row["prediction"]) < 90 for row in forecast)
    assert not list((tmp_path / "out").glob(".*"))


def test_predict_forecasts_each_series_and_scales_an_unknown_one_by_itself(tmp_path):
    rows = two_stores(tmp_path)
    path = write_rows(tmp_path / "stores.csv", ["store", "timestamp", "value"], rows)
    parameters = FAST | {"series_column": "store", "epochs": 2}
    train = make_context(tmp_path / "train", path, parameters)
    TimeSeriesForecaster().train(train)

    recent = [row for row in rows if row[1] >= "2024-01-14"]
    recent += [["west", when, value * 100] for store, when, value in recent if store == "north"]
    ctx = make_context(
        tmp_path,
        write_rows(tmp_path / "recent.csv", ["store", "timestamp", "value"], recent),
        parameters,
        model_dir=train.output_dir,
    )
    assert TimeSeriesForecaster().predict(ctx).metrics == {"rows": 18, "series": 3}
    forecast = read_csv(tmp_path / "out" / "predictions.csv")
    assert list(forecast[0]) == ["store", "step", "timestamp", "prediction"]
    assert [row["store"] for row in forecast] == ["north"] * 6 + ["south"] * 6 + ["west"] * 6
    by_store = {row["store"]: float(row["prediction"]) for row in forecast if row["step"] == "1"}
    assert by_store["south"] == pytest.approx(10 * by_store["north"], rel=0.3)
    assert by_store["west"] == pytest.approx(100 * by_store["north"], rel=0.3)
    assert "series 'west' was not in the training data" in logs(ctx).lower()


def test_predict_asked_to_stop_leaves_no_predictions_file(tmp_path, trained):
    ctx = make_context(tmp_path, trained.dataset_path, FAST, model_dir=trained.output_dir)
    ctx.stop_event.set()
    assert TimeSeriesForecaster().predict(ctx) is None
    assert not (tmp_path / "out").exists()


# Bad input


def hourly(count: int) -> list[list]:
    start = datetime(2024, 1, 1)
    return [[(start + timedelta(hours=h)).isoformat(), str(h % 24)] for h in range(count)]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [*hourly(5), ["yesterday", "1"]],
            r"Data row 6: 'yesterday' in column 'timestamp' is not a date and time",
        ),
        ([*hourly(3), ["2024-02-01T00:00:00", "lots"]], r"Data row 4: 'lots' .* is not a number"),
        ([*hourly(3), ["2024-01-01T01:00:00", "7"]], r"two rows at 2024-01-01T01:00:00"),
        (hourly(48), r"The series has 48 points; .* needs at least 49 points"),
        ([["", "1"], *hourly(3)], r"Data row 1 has no timestamp in column 'timestamp'"),
        ([["NA", "NA"]], r"no row with a value in 'value'"),
    ],
)
def test_data_problems_are_input_errors_in_words(tmp_path, rows, message):
    path = write_rows(tmp_path / "bad.csv", ["timestamp", "value"], rows)
    with pytest.raises(RecipeInputError, match=message):
        TimeSeriesForecaster().train(make_context(tmp_path, path, FAST))


def test_the_shortest_series_accepted_leaves_ten_training_windows(tmp_path):
    """49 points: 10 for validation (a fifth, rounded), 39 for training: a window of 24 and a
    horizon of 6 fit into them 10 times."""
    path = write_rows(tmp_path / "short.csv", ["timestamp", "value"], hourly(49))
    result = TimeSeriesForecaster().train(make_context(tmp_path, path, FAST | {"epochs": 1}))
    assert result.metrics["val_windows"] == 10 - 6 + 1


def test_a_missing_column_is_named_with_the_ones_there_are(tmp_path):
    path = write_rows(tmp_path / "bad.csv", ["time", "value"], hourly(100))
    with pytest.raises(RecipeInputError, match="no column 'timestamp'; its columns are: time"):
        TimeSeriesForecaster().train(make_context(tmp_path, path, FAST))
