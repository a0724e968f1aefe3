"""The time-series forecaster recipe: from the last `window` points of a series, a small MLP or
GRU predicts the next `horizon` points; it is measured against the seasonal-naive forecast (the
value one season earlier) on the same validation windows.

Each series is sorted by time, scaled by its training part's mean and standard deviation, and the
model sees each window relative to the window's own mean, so that a trend carrying the validation
part past the training range does not take the model out of what it learned. The validation part
is the last `validation_fraction` of every series. A run is a pure function of (data, parameters,
seed), and a run resumed from any checkpoint ends with the same weights as one that was never
interrupted (bit for bit on the CPU). torch is imported inside the functions, because the web
process imports this module to validate parameters.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from itertools import accumulate, pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.recipes.base import (
    CONFIG_FILENAME,
    PREDICTIONS_FILENAME,
    WEIGHTS_FILENAME,
    OnlinePredictor,
    Recipe,
    RecipeContext,
    RecipeInputError,
    RecipeResult,
    online_input_object,
)
from jobs.recipes.data import NULL_MARKERS, csv_chunks, dataset_row_count
from jobs.recipes.training import Trainer, derived_seed

if TYPE_CHECKING:
    import torch
    from torch import nn

# Fewer training windows than this per series is too little to learn from; with window and
# horizon it sets the shortest series a run accepts.
MIN_TRAINING_WINDOWS = 10
# Rows read at a time where the context does not say (ctx.chunk_rows).
READ_CHUNK_ROWS = 10_000
INFERENCE_BATCH_WINDOWS = 4_096


class TimeSeriesForecaster(Recipe):
    name = "timeseries-forecaster"
    version = "1.0"
    kind = "train"
    dataset_formats = ("csv", "parquet")
    online = True
    # The gate judges forecasts by the error training reports as val_mae (see
    # validation_outcomes), per series when a policy asks for the slice "series".
    gate_metric = ("mae", False)
    gate_slice_by = "series"
    parameter_schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Time-series forecaster",
        "description": (
            "Forecasts the next values of a series (or of several, told apart by a series "
            "column) from its recent past, and compares itself with the seasonal-naive forecast."
        ),
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "timestamp_column": {
                "type": "string",
                "minLength": 1,
                "default": "timestamp",
                "title": "Timestamp column",
                "description": "The column holding each point's date and time, like "
                "2024-05-31T13:00:00.",
            },
            "value_column": {
                "type": "string",
                "minLength": 1,
                "default": "value",
                "title": "Value column",
                "description": "The column holding the number to forecast.",
            },
            "series_column": {
                "type": "string",
                "minLength": 1,
                "title": "Series column",
                "description": "The column naming the series each row belongs to, when the "
                "table holds several; leave out for one series.",
            },
            "window": {
                "type": "integer",
                "minimum": 1,
                "maximum": 4096,
                "default": 48,
                "title": "Window",
                "description": "How many past points each forecast reads.",
            },
            "horizon": {
                "type": "integer",
                "minimum": 1,
                "maximum": 1024,
                "default": 12,
                "title": "Horizon",
                "description": "How many points ahead each forecast reaches.",
            },
            "season_length": {
                "type": "integer",
                "minimum": 1,
                "maximum": 100_000,
                "default": 24,
                "title": "Season length",
                "description": "Points per season (24 for hourly data with a daily cycle), for "
                "the seasonal-naive forecast the model is compared with.",
            },
            "model": {
                "enum": ["mlp", "gru"],
                "default": "mlp",
                "title": "Model",
                "description": "mlp reads the window as one vector; gru reads it point by point.",
            },
            "hidden_size": {
                "type": "integer",
                "minimum": 1,
                "maximum": 4096,
                "default": 64,
                "title": "Hidden size",
                "description": "Width of the model's hidden layers (or of the GRU's state).",
            },
            "epochs": {
                "type": "integer",
                "minimum": 1,
                "maximum": 1000,
                "default": 30,
                "title": "Epochs",
                "description": "The most passes over the training windows.",
            },
            "batch_size": {
                "type": "integer",
                "minimum": 1,
                "maximum": 65536,
                "default": 64,
                "title": "Batch size",
                "description": "Windows per optimizer step.",
            },
            "learning_rate": {
                "type": "number",
                "exclusiveMinimum": 0,
                "maximum": 1,
                "default": 0.001,
                "title": "Learning rate",
                "description": "Adam's step size.",
            },
            "validation_fraction": {
                "type": "number",
                "exclusiveMinimum": 0,
                "maximum": 0.5,
                "default": 0.2,
                "title": "Validation fraction",
                "description": "Share of each series, at its end, held out to measure the "
                "model and stop early.",
            },
            "early_stopping_patience": {
                "type": "integer",
                "minimum": 0,
                "maximum": 1000,
                "default": 5,
                "title": "Early stopping patience",
                "description": (
                    "Stop after this many epochs without a better validation loss and keep the "
                    "best epoch's weights; 0 trains every epoch."
                ),
            },
        },
    }

    def train(self, ctx: RecipeContext) -> RecipeResult | None:
        if ctx.model_dir is not None:
            raise RecipeInputError(
                "The time-series forecaster cannot fine-tune a trained model yet; train a new one."
            )
        if getattr(ctx, "world_size", 1) > 1:
            raise RecipeInputError(
                "The time-series forecaster trains in one process on one device; submit it with "
                "one GPU."
            )
        parameters = ctx.parameters
        columns = _Columns.of(parameters)
        series = _usable_series(ctx, _read_series(ctx, columns), parameters)
        splits = [_training_points(len(one), parameters) for one in series]
        stats = [_mean_std(one.values[:split]) for one, split in zip(series, splits, strict=True)]
        points = Points.of(series, stats)
        window, horizon = parameters["window"], parameters["horizon"]
        train_starts, val_starts = [], []
        for offset, one, split in zip(points.offsets, series, splits, strict=True):
            # A training window's targets lie in the training part; a validation window's
            # targets in the validation part, its inputs reaching back as far as needed.
            train_starts += range(offset, offset + split - window - horizon + 1)
            val_starts += range(offset + split - window, offset + len(one) - window - horizon + 1)
        config = {
            "recipe": TimeSeriesForecaster.name,
            "recipe_version": TimeSeriesForecaster.version,
            "architecture": {
                "model": parameters["model"],
                "window": window,
                "horizon": horizon,
                "hidden_size": parameters["hidden_size"],
            },
            **columns.config(),
            "season_length": parameters["season_length"],
            "series": [
                {"series": one.key, "mean": mean, "std": std, "training_points": split}
                for one, (mean, std), split in zip(series, stats, splits, strict=True)
            ],
        }
        ctx.log(
            f"Training the {parameters['model']} model on {len(train_starts)} windows of "
            f"{len(series)} series, validating on {len(val_starts)}; device {ctx.devices[0]}."
        )
        return _Trainer(ctx, config, points, train_starts, val_starts).run()

    def validation_outcomes(
        self, ctx: RecipeContext, *, model_dirs: dict[str, Path], split_seed: int, slice_column: str
    ) -> tuple[dict[str, list[float]], list[str | None]]:
        """For the evaluation gate: each model's mean absolute error, in the series' own units,
        on each validation window of the dataset (the horizon's points after a window whose
        forecast starts in the validation part), and, with the slice column "series", each
        window's series. The windows' mean is the `val_mae` a training run of `ctx.parameters`
        reports: the validation part is the end of every series, the same whatever the seed, so
        `split_seed` draws nothing here. A model reads its own window before each forecast start
        and scales a series it was not trained on by that series' training part."""
        import torch

        parameters = ctx.parameters
        columns = _Columns.of(parameters)
        series = _usable_series(ctx, _read_series(ctx, columns), parameters)
        splits = [_training_points(len(one), parameters) for one in series]
        own = [_mean_std(one.values[:split]) for one, split in zip(series, splits, strict=True)]
        device = torch.device(ctx.devices[0])
        models = {}
        for role, model_dir in model_dirs.items():
            model, config, _device = _load_model_dir(model_dir, device)
            if config["architecture"]["horizon"] != parameters["horizon"]:
                raise RecipeInputError(
                    f"The {role} forecasts {config['architecture']['horizon']} points ahead, the "
                    f"data's validation windows {parameters['horizon']}; they cannot be compared."
                )
            models[role] = model, config
        horizon = parameters["horizon"]
        reach = max(
            [
                parameters["window"],
                *(config["architecture"]["window"] for _, config in models.values()),
            ]
        )
        # Where each validation window's forecast starts, in the series laid end to end; a window
        # is left out only where a model reads further back than the series goes.
        offsets = [0, *accumulate(len(one) for one in series)][:-1]
        first = torch.tensor(
            [
                start
                for offset, one, split in zip(offsets, series, splits, strict=True)
                for start in range(offset + max(split, reach), offset + len(one) - horizon + 1)
            ],
            dtype=torch.int64,
            device=device,
        )
        key_at = [
            one.key
            for offset, one, split in zip(offsets, series, splits, strict=True)
            for _ in range(offset + max(split, reach), offset + len(one) - horizon + 1)
        ]
        outcomes = {}
        for role, (model, config) in models.items():
            stats = [
                _stats_for(ctx, config, one, fallback=scaling)
                for one, scaling in zip(series, own, strict=True)
            ]
            points = Points.of(series, stats).to(device)
            window = config["architecture"]["window"]
            starts = first - window
            predicted = _forecast(model, config["architecture"], points, starts)
            actual = points.raw[_target_index(starts, window, horizon)]
            outcomes[role] = (predicted - actual).abs().mean(dim=1).tolist()
        sliced = slice_column == self.gate_slice_by
        if sliced and columns.series is None:
            ctx.log("The model was trained on one series (no series_column); overall only.")
        slices = [key if sliced and columns.series else None for key in key_at]
        return outcomes, slices

    def evaluate(self, ctx: RecipeContext) -> dict[str, Any]:
        """Model and seasonal-naive errors on every window of the dataset whose forecast starts
        once a window and a season of history are known."""
        import torch

        model, config, device = _load_model(ctx)
        architecture = config["architecture"]
        window, horizon = architecture["window"], architecture["horizon"]
        first = max(window, config["season_length"])
        series = [
            one
            for one in _read_series(ctx, _Columns.from_config(config))
            if len(one) >= first + horizon
        ]
        if not series:
            raise RecipeInputError(
                f"No series has the {first + horizon} points an evaluation needs: a window "
                f"({window}) or a season ({config['season_length']}) of history, then the "
                f"horizon ({horizon})."
            )
        points = Points.of(series, [_stats_for(ctx, config, one) for one in series]).to(device)
        starts = [
            start
            for offset, one in zip(points.offsets, series, strict=True)
            for start in range(offset + first - window, offset + len(one) - window - horizon + 1)
        ]
        index = torch.tensor(starts, dtype=torch.int64, device=device)
        actual = points.raw[_target_index(index, window, horizon)]
        predicted = _forecast(model, architecture, points, index)
        naive = points.raw[_seasonal_naive_index(index, window, horizon, config["season_length"])]
        return {
            **_errors(predicted, actual),
            **{f"{name}_seasonal_naive": value for name, value in _errors(naive, actual).items()},
            "windows": len(starts),
            "series": len(series),
        }

    def predict(self, ctx: RecipeContext) -> RecipeResult | None:
        """Write predictions.csv: for each series, the `horizon` points after its last one, at
        timestamps spaced by its median interval. Rows stream through in chunks and each series
        keeps only its last points, so memory stays flat in the number of rows."""
        import torch

        model, config, device = _load_model(ctx)
        architecture = config["architecture"]
        window, horizon = architecture["window"], architecture["horizon"]
        # The window, and two points at least to measure the interval between them.
        needed = max(window, 2)
        tails = _read_tails(ctx, _Columns.from_config(config), keep=needed)
        if tails is None:
            return None
        forecasts = []
        for key in sorted(tails, key=str):
            tail = tails[key]
            if len(tail.series) >= needed:
                forecasts.append(tail)
            else:
                ctx.log(
                    f"{_name(key).capitalize()} has {len(tail.series)} points, fewer than the "
                    f"{needed} a forecast reads; it gets none."
                )
        if not forecasts:
            raise RecipeInputError(f"No series has the {needed} points a forecast reads.")
        series = [tail.series for tail in forecasts]
        stats = [_stats_for(ctx, config, tail.series, fallback=tail.stats()) for tail in forecasts]
        points = Points.of(series, stats).to(device)
        starts = torch.tensor(
            [
                offset + len(one) - window
                for offset, one in zip(points.offsets, series, strict=True)
            ],
            dtype=torch.int64,
            device=device,
        )
        predicted = _forecast(model, architecture, points, starts).cpu().tolist()
        ctx.output_dir.mkdir(parents=True, exist_ok=True)
        path = ctx.output_dir / PREDICTIONS_FILENAME
        partial = path.with_name(f".{path.name}.partial")
        series_column = config["series_column"]
        rows = 0
        try:
            with partial.open("w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(
                    ([series_column] if series_column else []) + ["step", "timestamp", "prediction"]
                )
                for one, values in zip(series, predicted, strict=True):
                    interval = statistics.median(
                        later - earlier for earlier, later in pairwise(one.timestamps)
                    )
                    for step, value in enumerate(values, 1):
                        moment = _format_time(one.timestamps[-1] + step * interval, one.aware)
                        writer.writerow(
                            ([one.key] if series_column else []) + [step, moment, repr(value)]
                        )
                        rows += 1
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        ctx.log(f"Forecast {horizon} steps for {len(series)} series.")
        relative = path.resolve().relative_to(ctx.workdir.resolve()).as_posix()
        return RecipeResult(
            {"rows": rows, "series": len(series)}, {PREDICTIONS_FILENAME: relative}, {}
        )

    @classmethod
    def online_predictor(cls, model_dir: Path, device: str = "cpu") -> OnlinePredictor:
        """Inputs are `{"history": [value, ...], "series": "name"}`: a series' latest values in
        time order, at least the model's window of them (the window last are read), and, when
        the model was trained on several series, which one (optional: a series it was not
        trained on is scaled by its own history, as batch prediction does). Outputs
        `{"forecast": [value, ...]}`, the next `horizon` values."""
        import torch

        model, config, target = _load_model_dir(model_dir, torch.device(device))
        architecture = config["architecture"]
        scaling = {known["series"]: (known["mean"], known["std"]) for known in config["series"]}

        def predict(inputs: list[Any]) -> list[dict[str, Any]]:
            if not inputs:
                return []
            series = [
                _online_series(item, position, architecture["window"])
                for position, item in enumerate(inputs)
            ]
            stats = [scaling.get(one.key) or _mean_std(one.values) for one in series]
            points = Points.of(series, stats).to(target)
            starts = torch.tensor(
                [
                    offset + len(one) - architecture["window"]
                    for offset, one in zip(points.offsets, series, strict=True)
                ],
                dtype=torch.int64,
                device=target,
            )
            forecasts = _forecast(model, architecture, points, starts).cpu().tolist()
            for position, values in enumerate(forecasts):
                if not all(map(math.isfinite, values)):
                    raise RecipeInputError(
                        f"inputs[{position}].history holds values too large to forecast."
                    )
            return [{"forecast": values} for values in forecasts]

        return predict


def _online_series(item: Any, position: int, window: int) -> Series:
    """One online input as a Series of its history (no timestamps: the values are in order);
    RecipeInputError naming the input when it is not one."""
    values = online_input_object(item, position, "history", list, "a list of numbers")
    if len(values) < window:
        raise RecipeInputError(
            f"inputs[{position}].history has {len(values)} values; the model reads the last "
            f"{window}."
        )
    if not all(
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        for value in values
    ):
        raise RecipeInputError(f"inputs[{position}].history must hold only finite numbers.")
    key = item.get("series")
    if key is not None and not isinstance(key, str):
        raise RecipeInputError(f"inputs[{position}].series must be text, the series' name.")
    recent = [float(value) for value in values[-window:]]
    return Series(key, list(range(len(recent))), recent, aware=False)


@dataclass(frozen=True)
class _Columns:
    timestamp: str
    value: str
    series: str | None

    @classmethod
    def of(cls, parameters: dict[str, Any]) -> _Columns:
        columns = cls(
            parameters["timestamp_column"],
            parameters["value_column"],
            parameters.get("series_column"),
        )
        names = columns.names()
        if len(set(names)) != len(names):
            raise RecipeInputError(
                "timestamp_column, value_column and series_column must name different columns."
            )
        return columns

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> _Columns:
        return cls(config["timestamp_column"], config["value_column"], config["series_column"])

    def names(self) -> list[str]:
        return [self.timestamp, self.value] + ([self.series] if self.series else [])

    def config(self) -> dict[str, Any]:
        return {
            "timestamp_column": self.timestamp,
            "value_column": self.value,
            "series_column": self.series,
        }


@dataclass
class Series:
    """One series' points in time order: seconds since the epoch (a time without a zone read
    as UTC) and values; `aware` says whether its timestamps carried a zone."""

    key: str | None
    timestamps: list[float]
    values: list[float]
    aware: bool

    def __len__(self) -> int:
        return len(self.values)


def _name(key: str | None) -> str:
    return "the series" if key is None else f"series {key!r}"


# Reading


def _read_columns(
    ctx: RecipeContext, names: list[str], chunk_rows: int
) -> Iterator[list[list[Any]]]:
    """The named columns, a chunk of at most `chunk_rows` rows at a time, as one list of cells
    per column: raw strings from a CSV, Python values (datetimes, numbers) from Parquet."""
    if ctx.dataset_format == "csv":
        return _csv_columns(ctx, names, chunk_rows)
    if ctx.dataset_format == "parquet":
        return _parquet_columns(ctx.dataset_path, names, chunk_rows)
    raise RecipeInputError(
        f"Datasets in the {ctx.dataset_format!r} format cannot be read as a table."
    )


def _missing_column(name: str, header: list[str]) -> RecipeInputError:
    return RecipeInputError(
        f"The dataset has no column {name!r}; its columns are: {', '.join(header)}."
    )


def _csv_columns(
    ctx: RecipeContext, names: list[str], chunk_rows: int
) -> Iterator[list[list[Any]]]:
    positions = None
    for chunk in csv_chunks(ctx.dataset_path, ctx.csv_dialect, chunk_rows=chunk_rows):
        if positions is None:
            for name in names:
                if name not in chunk.names:
                    raise _missing_column(name, chunk.names)
            positions = [chunk.names.index(name) for name in names]
        if chunk.row_count:
            yield [chunk.columns[position] for position in positions]


def _parquet_columns(path: Path, names: list[str], chunk_rows: int) -> Iterator[list[list[Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        header = parquet.schema_arrow.names
        for name in names:
            if name not in header:
                raise _missing_column(name, header)
        for batch in parquet.iter_batches(batch_size=chunk_rows, columns=names):
            columns = []
            for column in batch.columns:
                # Python's datetime holds microseconds; nanosecond timestamps are cut to them.
                if pa.types.is_timestamp(column.type) and column.type.unit == "ns":
                    column = column.cast(pa.timestamp("us", column.type.tz), safe=False)
                columns.append(column.to_pylist())
            yield columns
    except (pa.ArrowException, OSError) as exc:
        raise RecipeInputError(f"The Parquet file cannot be read: {exc}.") from exc


def _point_chunks(
    ctx: RecipeContext, columns: _Columns
) -> Iterator[tuple[int, list[tuple[str | None, float, bool, float]]]]:
    """For each chunk of rows: how many rows were read so far, and the chunk's points as (series
    key, seconds, timezone-aware, value), rows without a value left out; RecipeInputError naming
    the row and column of a cell that cannot be read."""
    row = skipped = 0
    chunks = _read_columns(ctx, columns.names(), _chunk_rows(ctx))
    for chunk in chunks:
        keys = chunk[2] if columns.series else [None] * len(chunk[0])
        points = []
        for stamp, raw_value, raw_key in zip(chunk[0], chunk[1], keys, strict=True):
            row += 1
            value = _number(raw_value, row, columns.value)
            if value is None:
                skipped += 1
                continue
            key = None if columns.series is None else _key(raw_key, row, columns.series)
            points.append((key, *_timestamp(stamp, row, columns.timestamp), value))
        yield row, points
    if skipped:
        ctx.log(f"{skipped} rows without a value in column {columns.value!r} were left out.")


def _chunk_rows(ctx: RecipeContext) -> int:
    return getattr(ctx, "chunk_rows", READ_CHUNK_ROWS)


def _key(value: Any, row: int, column: str) -> str:
    text = None if value is None else str(value).strip()
    if text is None or text in NULL_MARKERS:
        raise RecipeInputError(f"Data row {row} has no value in the series column {column!r}.")
    return text


def _number(value: Any, row: int, column: str) -> float | None:
    """The cell as a float; None when it is missing."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise RecipeInputError(f"Data row {row}: column {column!r} holds true/false, not numbers.")
    if isinstance(value, int | float):
        number = float(value)
    else:
        text = str(value).strip()
        if text in NULL_MARKERS:
            return None
        try:
            number = float(text)
        except ValueError:
            raise RecipeInputError(
                f"Data row {row}: {text!r} in column {column!r} is not a number."
            ) from None
    if math.isnan(number):
        return None
    if not math.isfinite(number):
        raise RecipeInputError(f"Data row {row}: column {column!r} holds an infinite value.")
    return number


def _timestamp(value: Any, row: int, column: str) -> tuple[float, bool]:
    """(seconds since the epoch, whether the time carried a zone)."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day)
    else:
        text = None if value is None else str(value).strip()
        if text is None or text in NULL_MARKERS:
            raise RecipeInputError(f"Data row {row} has no timestamp in column {column!r}.")
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise RecipeInputError(
                f"Data row {row}: {text!r} in column {column!r} is not a date and time; write "
                "them like 2024-05-31T13:00:00 or 2024-05-31 13:00:00+02:00."
            ) from None
    aware = moment.tzinfo is not None
    return (moment if aware else moment.replace(tzinfo=UTC)).timestamp(), aware


def _format_time(seconds: float, aware: bool) -> str:
    moment = datetime.fromtimestamp(seconds, UTC)
    return (moment if aware else moment.replace(tzinfo=None)).isoformat()


def _read_series(ctx: RecipeContext, columns: _Columns) -> list[Series]:
    """Every series of the dataset in time order, ordered by key."""
    points: dict[str | None, list[tuple[float, float, bool]]] = {}
    for _, chunk in _point_chunks(ctx, columns):
        for key, seconds, aware, value in chunk:
            points.setdefault(key, []).append((seconds, value, aware))
    if not points:
        raise RecipeInputError(f"The dataset has no row with a value in {columns.value!r}.")
    series = []
    for key in sorted(points, key=str):
        timestamps, values, aware = zip(*sorted(points[key]), strict=True)
        series.append(_distinct_times(Series(key, list(timestamps), list(values), aware[-1])))
    return series


def _distinct_times(series: Series) -> Series:
    for earlier, later in pairwise(series.timestamps):
        if earlier == later:
            raise RecipeInputError(
                f"{_name(series.key).capitalize()} has two rows at "
                f"{_format_time(later, series.aware)}; keep one value per time."
            )
    return series


@dataclass
class _Tail:
    """The last points of one series seen so far, and running moments of all its values
    (Welford's), for a series the model has no scaling of its own for."""

    series: Series
    keep: int
    count: int = 0
    mean: float = 0.0
    squares: float = 0.0

    def add(self, seconds: float, value: float, aware: bool) -> None:
        self.series.timestamps.append(seconds)
        self.series.values.append(value)
        self.series.aware = aware
        self.count += 1
        delta = value - self.mean
        self.mean += delta / self.count
        self.squares += delta * (value - self.mean)
        if len(self.series) >= 2 * self.keep:
            self.trim()

    def trim(self) -> None:
        ordered = sorted(zip(self.series.timestamps, self.series.values, strict=True))
        ordered = ordered[-self.keep :]
        self.series.timestamps = [seconds for seconds, _ in ordered]
        self.series.values = [value for _, value in ordered]

    def stats(self) -> tuple[float, float]:
        return self.mean, _spread(math.sqrt(self.squares / self.count))


def _read_tails(ctx: RecipeContext, columns: _Columns, keep: int) -> dict[str | None, _Tail] | None:
    """Each series' last `keep` points in time order; None when asked to stop."""
    tails: dict[str | None, _Tail] = {}
    total = dataset_row_count(ctx.dataset_path, ctx.dataset_format)
    for rows, chunk in _point_chunks(ctx, columns):
        if ctx.should_stop():
            return None
        for key, seconds, aware, value in chunk:
            tail = tails.get(key)
            if tail is None:
                tail = tails[key] = _Tail(Series(key, [], [], aware), keep)
            tail.add(seconds, value, aware)
        ctx.progress(rows, total, 1)
    if not tails:
        raise RecipeInputError(f"The dataset has no row with a value in {columns.value!r}.")
    for tail in tails.values():
        tail.trim()
        _distinct_times(tail.series)
    return tails


# Splitting and scaling


def _validation_points(points: int, parameters: dict[str, Any]) -> int:
    """The validation part's length: its share of the series, and at least one horizon."""
    return max(parameters["horizon"], round(points * parameters["validation_fraction"]))


def _training_points(points: int, parameters: dict[str, Any]) -> int:
    return points - _validation_points(points, parameters)


def _points_needed(parameters: dict[str, Any]) -> int:
    """The shortest series that leaves MIN_TRAINING_WINDOWS training windows and a season of
    history before the validation part (for the seasonal-naive forecast)."""
    training = max(
        parameters["window"] + parameters["horizon"] + MIN_TRAINING_WINDOWS - 1,
        parameters["season_length"],
    )
    points = training + parameters["horizon"]
    while _training_points(points, parameters) < training:
        points += 1
    return points


def _usable_series(
    ctx: RecipeContext, series: list[Series], parameters: dict[str, Any]
) -> list[Series]:
    needed = _points_needed(parameters)
    usable = [one for one in series if len(one) >= needed]
    reason = (
        f"with window {parameters['window']}, horizon {parameters['horizon']}, season_length "
        f"{parameters['season_length']} and validation_fraction "
        f"{parameters['validation_fraction']:g}, a series needs at least {needed} points"
    )
    if not usable:
        longest = max(len(one) for one in series)
        what = "The series has" if len(series) == 1 else "The longest series has"
        raise RecipeInputError(
            f"{what} {longest} points; {reason}. Upload a longer history or lower the window "
            "and horizon."
        )
    for one in series:
        if len(one) < needed:
            ctx.log(f"{_name(one.key).capitalize()} has {len(one)} points; {reason}. Left out.")
    return usable


def _spread(std: float) -> float:
    # A constant series carries no scale; dividing by 1 keeps it finite.
    return std if std > 1e-12 else 1.0


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = math.fsum(values) / len(values)
    return mean, _spread(math.sqrt(math.fsum((x - mean) ** 2 for x in values) / len(values)))


def _stats_for(
    ctx: RecipeContext,
    config: dict[str, Any],
    series: Series,
    fallback: tuple[float, float] | None = None,
) -> tuple[float, float]:
    """The training scaling of `series`; for a series the model was not trained on, the mean
    and standard deviation of its own values here."""
    for known in config["series"]:
        if known["series"] == series.key:
            return known["mean"], known["std"]
    ctx.log(
        f"{_name(series.key).capitalize()} was not in the training data; it is scaled by its "
        "own mean and standard deviation."
    )
    return fallback or _mean_std(series.values)


@dataclass
class Points:
    """Series laid end to end (series i starts at offsets[i]): raw values, values scaled by
    their series' mean and standard deviation, and those per point, to scale back."""

    raw: torch.Tensor
    scaled: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    offsets: list[int]

    @classmethod
    def of(cls, series: list[Series], stats: list[tuple[float, float]]) -> Points:
        import torch

        lengths = torch.tensor([len(one) for one in series])
        raw = torch.tensor([value for one in series for value in one.values], dtype=torch.float64)
        mean, std = torch.tensor(stats, dtype=torch.float64).repeat_interleave(lengths, dim=0).T
        offsets = [0, *accumulate(lengths.tolist())][:-1]
        return cls(raw, ((raw - mean) / std).float(), mean, std, offsets)

    def to(self, device: torch.device) -> Points:
        return Points(
            self.raw.to(device),
            self.scaled.to(device),
            self.mean.to(device),
            self.std.to(device),
            self.offsets,
        )


def _input_index(starts: torch.Tensor, window: int) -> torch.Tensor:
    import torch

    return starts[:, None] + torch.arange(window, device=starts.device)


def _target_index(starts: torch.Tensor, window: int, horizon: int) -> torch.Tensor:
    import torch

    return starts[:, None] + window + torch.arange(horizon, device=starts.device)


def _seasonal_naive_index(
    starts: torch.Tensor, window: int, horizon: int, season: int
) -> torch.Tensor:
    """For step h after the window's last point t, the point t + h - season * k with the
    smallest k that lands on or before t: the same moment one (or more) seasons back."""
    import torch

    steps = torch.arange(1, horizon + 1, device=starts.device)
    back = season * torch.div(steps + season - 1, season, rounding_mode="floor")
    return starts[:, None] + window - 1 + steps - back


# The model


def _build_model(architecture: dict[str, Any]) -> nn.ModuleDict:
    from torch import nn

    window, horizon = architecture["window"], architecture["horizon"]
    hidden = architecture["hidden_size"]
    if architecture["model"] == "mlp":
        return nn.ModuleDict(
            {
                "mlp": nn.Sequential(
                    nn.Linear(window, hidden),
                    nn.ReLU(),
                    nn.Linear(hidden, hidden),
                    nn.ReLU(),
                    nn.Linear(hidden, horizon),
                )
            }
        )
    return nn.ModuleDict(
        {"gru": nn.GRU(1, hidden, batch_first=True), "head": nn.Linear(hidden, horizon)}
    )


def _forward(
    model: nn.ModuleDict, architecture: dict[str, Any], inputs: torch.Tensor
) -> torch.Tensor:
    """The scaled forecasts (rows, horizon) for scaled windows (rows, window); the model sees
    and predicts each window relative to its mean."""
    level = inputs.mean(dim=1, keepdim=True)
    centred = inputs - level
    if architecture["model"] == "mlp":
        return model["mlp"](centred) + level
    states, _ = model["gru"](centred.unsqueeze(-1))
    return model["head"](states[:, -1]) + level


def _scaled_forecast(
    model: nn.ModuleDict, architecture: dict[str, Any], points: Points, starts: torch.Tensor
) -> torch.Tensor:
    import torch

    model.eval()
    with torch.no_grad():
        chunks = [
            _forward(
                model,
                architecture,
                points.scaled[
                    _input_index(starts[i : i + INFERENCE_BATCH_WINDOWS], architecture["window"])
                ],
            )
            for i in range(0, len(starts), INFERENCE_BATCH_WINDOWS)
        ]
    model.train()
    return torch.cat(chunks)


def _forecast(
    model: nn.ModuleDict, architecture: dict[str, Any], points: Points, starts: torch.Tensor
) -> torch.Tensor:
    """Forecasts in the series' own units (rows, horizon), float64."""
    scaled = _scaled_forecast(model, architecture, points, starts).double()
    return scaled * points.std[starts, None] + points.mean[starts, None]


def _errors(predicted: torch.Tensor, actual: torch.Tensor) -> dict[str, float | None]:
    """Mean absolute error, and mean absolute percentage error (in percent) over the actual
    values that are not zero; None when all are."""
    error = (predicted - actual).abs()
    nonzero = actual.abs() > 1e-12
    mape = (error[nonzero] / actual[nonzero].abs()).mean().item() * 100 if nonzero.any() else None
    return {"mae": error.mean().item(), "mape": mape}


def _load_model(ctx: RecipeContext) -> tuple[nn.ModuleDict, dict[str, Any], torch.device]:
    import torch

    if ctx.model_dir is None:
        raise ValueError("Evaluation and prediction need ctx.model_dir, the trained model.")
    return _load_model_dir(ctx.model_dir, torch.device(ctx.devices[0]))


def _load_model_dir(
    model_dir: Path, device: torch.device
) -> tuple[nn.ModuleDict, dict[str, Any], torch.device]:
    from safetensors.torch import load_file

    config = json.loads((model_dir / CONFIG_FILENAME).read_text(encoding="utf-8"))
    if config.get("recipe") != TimeSeriesForecaster.name:
        raise RecipeInputError("The model was not trained by the time-series forecaster.")
    model = _build_model(config["architecture"])
    model.load_state_dict(load_file(model_dir / WEIGHTS_FILENAME))
    model.to(device)
    return model, config, device


def _signature(config: dict[str, Any]) -> dict[str, Any]:
    columns = [
        {"name": config["timestamp_column"], "dtype": "timestamp"},
        {"name": config["value_column"], "dtype": "float64"},
    ]
    if config["series_column"]:
        columns.append({"name": config["series_column"], "dtype": "string"})
    return {
        "columns": columns,
        "window": config["architecture"]["window"],
        "horizon": config["architecture"]["horizon"],
        "series": [known["series"] for known in config["series"]],
    }


class _Trainer(Trainer):
    """The time-series forecaster's training run (see Trainer)."""

    recipe = TimeSeriesForecaster
    mixed_precision = False

    def __init__(
        self,
        ctx: RecipeContext,
        config: dict[str, Any],
        points: Points,
        train_starts: list[int],
        val_starts: list[int],
    ) -> None:
        import torch

        super().__init__(ctx)
        self.config = config
        self.architecture = config["architecture"]
        self.window, self.horizon = self.architecture["window"], self.architecture["horizon"]
        self.points = points.to(self.device)
        self.train_starts = torch.tensor(train_starts, dtype=torch.int64, device=self.device)
        self.val_starts = torch.tensor(val_starts, dtype=torch.int64, device=self.device)
        self.val_actual = self.points.raw[_target_index(self.val_starts, self.window, self.horizon)]
        naive = self.points.raw[
            _seasonal_naive_index(
                self.val_starts, self.window, self.horizon, config["season_length"]
            )
        ]
        self.seasonal_naive = _errors(naive, self.val_actual)
        self.batches = math.ceil(len(train_starts) / self.batch_size)
        self._start_model(_build_model, self.architecture, self.parameters["learning_rate"])

    def _epoch_order(self) -> torch.Tensor:
        import torch

        generator = torch.Generator().manual_seed(derived_seed(self.ctx.seed, self.epoch + 1))
        order = torch.randperm(len(self.train_starts), generator=generator)
        return self.train_starts[order.to(self.device)]

    def _train_step(self, rows: torch.Tensor) -> None:
        import torch.nn.functional as F

        inputs = self.points.scaled[_input_index(rows, self.window)]
        targets = self.points.scaled[_target_index(rows, self.window, self.horizon)]
        self._step(F.mse_loss(_forward(self.model, self.architecture, inputs), targets))

    def _val_metrics(self) -> dict[str, float | None]:
        """The model's loss and errors, and beside them the seasonal-naive forecast's (the same
        every epoch)."""
        import torch.nn.functional as F

        scaled = _scaled_forecast(self.model, self.architecture, self.points, self.val_starts)
        targets = self.points.scaled[_target_index(self.val_starts, self.window, self.horizon)]
        std = self.points.std[self.val_starts, None]
        predicted = scaled.double() * std + self.points.mean[self.val_starts, None]
        naive = {f"{name}_seasonal_naive": value for name, value in self.seasonal_naive.items()}
        return {
            "loss": F.mse_loss(scaled, targets).item(),
            **_errors(predicted, self.val_actual),
            **naive,
        }

    def _result(self) -> RecipeResult:
        artifacts = self._write_best_model(self.config)
        metrics = self._best_epoch_metrics() | {
            "series": len(self.points.offsets),
            "val_windows": len(self.val_starts),
        }
        self.ctx.log(
            f"Validation MAE {metrics['val_mae']:.4g}; the seasonal-naive forecast's is "
            f"{self.seasonal_naive['mae']:.4g}."
        )
        return RecipeResult(metrics, artifacts, _signature(self.config))

    def _identity(self) -> dict[str, Any]:
        return {
            "series": self.config["series"],
            "windows": [len(self.train_starts), len(self.val_starts)],
        }
