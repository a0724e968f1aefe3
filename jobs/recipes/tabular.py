"""The tabular classifier recipe: numeric columns standardized, text columns embedded, an MLP on
top, trained with Adam and early stopping on the validation loss; fine-tuned from an earlier
model on new data of the same shape; data parallel over several processes; batch inference over
a dataset of any size, and `online_predictor`, which a deployment's replica loads once.

A run is a pure function of (data, parameters, seed, number of processes): the split and each
epoch's shuffle come from generators derived from the seed, so a run resumed from any checkpoint
ends with the same weights as one that was never interrupted (bit for bit on the CPU). torch is
imported inside the functions, because the web process imports this module to validate
parameters.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
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
    class_probabilities,
)
from jobs.recipes.data import (
    Table,
    cast_column,
    dataset_row_count,
    read_table,
    read_table_chunks,
)
from jobs.recipes.training import Trainer, autocast, derived_seed

if TYPE_CHECKING:
    import torch
    from torch import nn

MAX_CLASSES = 1_000
# Rarer values of a text column share the unknown embedding, which bounds the model's size.
MAX_VOCABULARY = 10_000
EVAL_CHUNK_ROWS = 65_536
NUMERIC_DTYPES = frozenset({"int64", "float64", "bool"})
PREDICTION_COLUMNS = ("prediction", "probability")
# The validation metrics, in the order rank 0 sends them to the other ranks.
_VAL_METRICS = ("loss", "accuracy", "f1_macro", "roc_auc")


class TabularClassifier(Recipe):
    name = "tabular-classifier"
    version = "1.0"
    kind = "train"
    dataset_formats = ("csv", "parquet")
    distributed = True
    online = True
    parameter_schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Tabular classifier",
        "description": (
            "Predicts a class column from the other columns of a table. Numeric columns are "
            "standardized, text columns get learned embeddings."
        ),
        "type": "object",
        "additionalProperties": False,
        "required": ["target"],
        "properties": {
            "target": {
                "type": "string",
                "minLength": 1,
                "title": "Target column",
                "description": "The column to predict; every other column is an input.",
            },
            "hidden_sizes": {
                "type": "array",
                "items": {"type": "integer", "minimum": 1, "maximum": 4096},
                "maxItems": 8,
                "default": [64, 32],
                "title": "Hidden layer sizes",
                "description": "Width of each hidden layer; an empty list is logistic regression.",
            },
            "epochs": {
                "type": "integer",
                "minimum": 1,
                "maximum": 1000,
                "default": 20,
                "title": "Epochs",
                "description": "The most passes over the training rows.",
            },
            "batch_size": {
                "type": "integer",
                "minimum": 1,
                "maximum": 65536,
                "default": 64,
                "title": "Batch size",
                "description": (
                    "Rows per optimizer step on each device; with several GPUs a step sees "
                    "this many rows from each."
                ),
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
                "description": "Share of the rows held out to measure the model and stop early.",
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
            "embedding_dim": {
                "type": "integer",
                "minimum": 1,
                "maximum": 256,
                "default": 4,
                "title": "Embedding size",
                "description": "Length of the vector learned for each value of a text column.",
            },
        },
    }

    def train(self, ctx: RecipeContext) -> RecipeResult | None:
        table = read_table(ctx.dataset_path, ctx.dataset_format, csv_dialect=ctx.csv_dialect)
        for name, column_type in table.ignored.items():
            ctx.log(f"Column {name!r} is not used: its type {column_type} is not supported.")
        target = ctx.parameters["target"]
        parent = None if ctx.model_dir is None else _ParentModel.load(ctx.model_dir)
        if parent is not None:
            parent.preprocessing.check_fits(table, target)
        train_rows, val_rows = _split(_labelled_rows(table, target), ctx.parameters, ctx.seed)
        if parent is None:
            preprocessing = Preprocessing.fit(table, target, train_rows)
            architecture = preprocessing.architecture(ctx.parameters)
        else:
            preprocessing, architecture = parent.preprocessing, parent.config["architecture"]
            ctx.log(
                "Fine-tuning the given model: it keeps its columns, classes and layers "
                f"(hidden_sizes {architecture['hidden_sizes']}, embedding_dim "
                f"{architecture['embedding_dim']})."
            )
        train_data, _ = preprocessing.encode(table, train_rows)
        val_data, unknown = preprocessing.encode(table, val_rows)
        if unknown:
            ctx.log(f"{unknown} validation rows have a class no training row has; left out.")
        if not len(val_data.target):
            raise RecipeInputError(
                "No validation row has a class that the training rows have; "
                "upload more rows per class."
            )
        processes = f" in each of {ctx.world_size} processes" if ctx.world_size > 1 else ""
        ctx.log(
            f"Training on {len(train_data.target)} rows, validating on {len(val_data.target)}; "
            f"{len(preprocessing.classes)} classes; device {ctx.devices[0]}{processes}."
        )
        trainer = _Trainer(ctx, preprocessing, architecture, train_data, val_data, parent)
        return trainer.run()

    def evaluate(self, ctx: RecipeContext) -> dict[str, Any]:
        import torch

        if ctx.model_dir is None:
            raise ValueError("evaluate needs ctx.model_dir, the trained model's artifacts.")
        config = _model_config(ctx.model_dir)
        preprocessing = Preprocessing.from_config(config)
        table = read_table(ctx.dataset_path, ctx.dataset_format, csv_dialect=ctx.csv_dialect)
        data, unknown = preprocessing.encode(table, _labelled_rows(table, preprocessing.target))
        if not len(data.target):
            raise RecipeInputError("No row of the dataset has a class the model knows.")
        device = torch.device(ctx.devices[0])
        data = data.to(device)
        model = _load_network(ctx.model_dir, config, device)
        logits = _predict_logits(model, data.numeric, data.categorical)
        metrics = _classification_metrics(logits, data.target, len(config["classes"]))
        return {**metrics, "rows": len(data.target), "rows_with_unknown_class": unknown}

    def validation_outcomes(
        self, ctx: RecipeContext, *, model_dirs: dict[str, Path], split_seed: int, slice_column: str
    ) -> tuple[dict[str, list[bool]], list[str | None]]:
        """For the evaluation gate: whether each model in `model_dirs` (by role) predicted each
        validation row of the dataset right, and each row's value of `slice_column` (None when
        the dataset lacks it). The rows are the ones a training run of `ctx.parameters` seeded
        with `split_seed` held out, so a model that run made never saw them."""
        import torch

        table = read_table(ctx.dataset_path, ctx.dataset_format, csv_dialect=ctx.csv_dialect)
        target = ctx.parameters["target"]
        _train_rows, rows = _split(_labelled_rows(table, target), ctx.parameters, split_seed)
        truth = table.columns[target].values
        device = torch.device(ctx.devices[0])
        outcomes = {}
        for role, model_dir in model_dirs.items():
            config = _model_config(model_dir)
            preprocessing = Preprocessing.from_config(config)
            numeric, categorical = preprocessing.features(table, rows)
            model = _load_network(model_dir, config, device)
            predicted = _predict_logits(model, numeric.to(device), categorical.to(device))
            outcomes[role] = [
                preprocessing.classes[label] == truth[row]
                for label, row in zip(predicted.argmax(dim=1).tolist(), rows, strict=True)
            ]
        column = table.columns.get(slice_column) if slice_column else None
        slices = [None if column is None else _cell_text(column.values[row]) for row in rows]
        return outcomes, slices

    def predict(self, ctx: RecipeContext) -> RecipeResult | None:
        """See Recipe.predict. The input's cells are written back as read (a missing one
        empty); `probability` is that of the predicted class."""
        import torch

        if ctx.model_dir is None:
            raise ValueError("predict needs ctx.model_dir, the trained model's artifacts.")
        config = _model_config(ctx.model_dir)
        preprocessing = Preprocessing.from_config(config)
        device = torch.device(ctx.devices[0])
        model = _load_network(ctx.model_dir, config, device)
        total = dataset_row_count(ctx.dataset_path, ctx.dataset_format)
        chunks = read_table_chunks(
            ctx.dataset_path,
            ctx.dataset_format,
            chunk_rows=ctx.chunk_rows,
            csv_dialect=ctx.csv_dialect,
        )
        ctx.output_dir.mkdir(parents=True, exist_ok=True)
        path = ctx.output_dir / PREDICTIONS_FILENAME
        # Written aside and renamed once complete, so a stopped run leaves no partial file.
        partial = path.with_name(f".{path.name}.tmp")
        rows, copied = 0, None
        try:
            with partial.open("w", newline="", encoding="utf-8") as out:
                writer = csv.writer(out)
                for chunk in chunks:
                    if ctx.should_stop():
                        return None
                    if copied is None:
                        copied = preprocessing.copied_columns(chunk, ctx.log)
                        writer.writerow([*copied, *PREDICTION_COLUMNS])
                    if not chunk.row_count:  # an empty dataset: the header alone
                        continue
                    inputs = preprocessing.cast_inputs(chunk)
                    numeric, categorical = preprocessing.features(inputs, range(chunk.row_count))
                    logits = _predict_logits(model, numeric.to(device), categorical.to(device))
                    confidence, predicted = logits.softmax(dim=1).max(dim=1)
                    values = [chunk.columns[name].values for name in copied]
                    writer.writerows(
                        [
                            *(_cell_text(column[row]) for column in values),
                            _cell_text(preprocessing.classes[label]),
                            repr(probability),
                        ]
                        for row, (label, probability) in enumerate(
                            zip(predicted.tolist(), confidence.tolist(), strict=True)
                        )
                    )
                    rows += chunk.row_count
                    ctx.progress(rows, total, 1)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        ctx.log(f"Predicted {rows} rows.")
        return RecipeResult({"rows": rows}, {PREDICTIONS_FILENAME: ctx.relative(path)}, {})

    @classmethod
    def online_predictor(cls, model_dir: Path, device: str = "cpu") -> OnlinePredictor:
        """Inputs are rows, objects of column name to value as a model version's input signature
        lists them (None a missing value); outputs `{"label": class, "probabilities": {class:
        p}}`."""
        import torch

        config = _model_config(model_dir)
        preprocessing = Preprocessing.from_config(config)
        target = torch.device(device)
        model = _load_network(model_dir, config, target).eval()

        def predict(inputs: list[Any]) -> list[dict[str, Any]]:
            if not inputs:
                return []
            numeric_rows, categorical_rows = preprocessing.row_features(inputs, label="inputs")
            numeric = torch.tensor(numeric_rows, dtype=torch.float32).reshape(len(inputs), -1)
            categorical = torch.tensor(categorical_rows, dtype=torch.int64).reshape(len(inputs), -1)
            logits = _predict_logits(model, numeric.to(target), categorical.to(target))
            probabilities = logits.double().softmax(dim=1).tolist()
            return class_probabilities(preprocessing.classes, probabilities)

        return predict


@dataclass
class Encoded:
    """Model inputs for a set of rows: standardized numbers, vocabulary indices, class indices."""

    numeric: torch.Tensor
    categorical: torch.Tensor
    target: torch.Tensor

    def to(self, device: torch.device) -> Encoded:
        return Encoded(self.numeric.to(device), self.categorical.to(device), self.target.to(device))


@dataclass
class Preprocessing:
    """How raw columns become model inputs, fitted on the training rows; saved in config.json so
    that evaluation and inference encode new rows the same way."""

    target: str
    target_dtype: str
    classes: list[Any]
    columns: list[dict[str, Any]]

    @classmethod
    def fit(cls, table: Table, target: str, rows: list[int]) -> Preprocessing:
        column = table.columns[target]
        counts = Counter(column.values[row] for row in rows)
        if len(counts) < 2:
            raise RecipeInputError(
                f"The target column {target!r} has a single class among the training rows; "
                "a classifier needs at least two."
            )
        if len(counts) > MAX_CLASSES:
            raise RecipeInputError(
                f"The target column {target!r} has {len(counts):,} distinct values, more than "
                f"the {MAX_CLASSES:,} classes this recipe predicts; is it a continuous quantity?"
            )
        features = [feature for name, feature in table.columns.items() if name != target]
        if not features:
            raise RecipeInputError("The dataset has no usable column besides the target.")
        return cls(
            target=target,
            target_dtype=column.dtype,
            classes=sorted(counts),
            columns=[
                _fit_column(feature.name, feature.dtype, feature.values, rows)
                for feature in features
            ],
        )

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Preprocessing:
        return cls(config["target"], config["target_dtype"], config["classes"], config["columns"])

    def config(self, architecture: dict[str, Any]) -> dict[str, Any]:
        return {
            "recipe": TabularClassifier.name,
            "recipe_version": TabularClassifier.version,
            "architecture": architecture,
            "target": self.target,
            "target_dtype": self.target_dtype,
            "classes": self.classes,
            "columns": self.columns,
        }

    def input_signature(self) -> dict[str, Any]:
        return {
            "columns": [{"name": spec["name"], "dtype": spec["dtype"]} for spec in self.columns],
            "target": self.target,
            "classes": self.classes,
        }

    def architecture(self, parameters: dict[str, Any]) -> dict[str, Any]:
        return {
            "numeric_features": sum(spec["encoding"] == "standardize" for spec in self.columns),
            "embedding_sizes": [
                len(spec["vocabulary"]) + 1
                for spec in self.columns
                if spec["encoding"] == "embedding"
            ],
            "embedding_dim": parameters["embedding_dim"],
            "hidden_sizes": parameters["hidden_sizes"],
            "classes": len(self.classes),
        }

    def encode(self, table: Table, rows: list[int]) -> tuple[Encoded, int]:
        """The rows whose class is one of `classes`, encoded, and how many were left out."""
        import torch

        class_index = {label: index for index, label in enumerate(self.classes)}
        target_values = table.columns[self.target].values
        known = [row for row in rows if target_values[row] in class_index]
        numeric, categorical = self.features(table, known)
        encoded = Encoded(
            numeric=numeric,
            categorical=categorical,
            target=torch.tensor(
                [class_index[target_values[row]] for row in known], dtype=torch.int64
            ),
        )
        return encoded, len(rows) - len(known)

    def features(self, table: Table, rows: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's inputs for `rows` of `table`: standardized numbers, vocabulary indices."""
        import torch

        rows = list(rows)
        numeric, categorical = [], []
        for spec in self.columns:
            column = table.columns.get(spec["name"])
            if column is None:
                raise RecipeInputError(f"The dataset has no column {spec['name']!r}.")
            values = [column.values[row] for row in rows]
            if spec["encoding"] == "standardize":
                if column.dtype not in NUMERIC_DTYPES:
                    raise RecipeInputError(f"Column {spec['name']!r} must hold numbers.")
                numeric.append([_standardized(spec, value) for value in values])
            else:
                index = _vocabulary_index(spec)
                categorical.append([0 if v is None else index.get(str(v), 0) for v in values])
        return (
            _matrix(numeric, len(rows), torch.float32),
            _matrix(categorical, len(rows), torch.int64),
        )

    def row_features(
        self, rows: Sequence[Any], *, label: str = "rows"
    ) -> tuple[list[list[float]], list[list[int]]]:
        """(numbers, vocabulary indices) per row of `rows`, objects of column name to value as
        an API client sends them, each checked against the column's type; errors name a row
        `<label>[i]`, as the client's request calls the list."""
        indices = {
            spec["name"]: _vocabulary_index(spec)
            for spec in self.columns
            if spec["encoding"] == "embedding"
        }
        numeric, categorical = [], []
        for position, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise RecipeInputError(f"{label}[{position}] must be an object of column values.")
            numbers, positions = [], []
            for spec in self.columns:
                value = _row_value(row, f"{label}[{position}]", spec)
                if spec["encoding"] == "standardize":
                    numbers.append(_standardized(spec, value))
                else:
                    positions.append(0 if value is None else indices[spec["name"]].get(value, 0))
            numeric.append(numbers)
            categorical.append(positions)
        return numeric, categorical

    def cast_inputs(self, chunk: Table) -> Table:
        """The chunk's input columns as `features` takes them: numbers (or booleans) for the
        standardized columns, text for the embedded ones."""
        columns = {}
        for spec in self.columns:
            if spec["encoding"] == "embedding":
                dtype = "string"
            else:
                dtype = "bool" if spec["dtype"] == "bool" else "float64"
            column = chunk.columns[spec["name"]]
            columns[spec["name"]] = cast_column(column, dtype, first_row=chunk.first_row)
        return Table(columns, chunk.row_count, first_row=chunk.first_row)

    def copied_columns(self, chunk: Table, log: Callable[[str], None]) -> list[str]:
        """The columns of the dataset that predictions.csv repeats: all but the target and the
        prediction columns. RecipeInputError if it lacks a column the model reads."""
        for spec in self.columns:
            if spec["name"] in chunk.ignored:
                raise RecipeInputError(
                    f"Column {spec['name']!r} has the type {chunk.ignored[spec['name']]}; the "
                    f"model reads it as {spec['dtype']}."
                )
        missing = [spec["name"] for spec in self.columns if spec["name"] not in chunk.columns]
        if missing:
            raise RecipeInputError(
                f"The dataset lacks columns the model needs: {_names(missing)}; "
                f"its columns are: {_names(list(chunk.columns))}."
            )
        for name, column_type in chunk.ignored.items():
            log(
                f"Column {name!r} is not copied to the predictions: its type {column_type} is "
                "not supported."
            )
        for name in PREDICTION_COLUMNS:
            if name in chunk.columns:
                log(f"The dataset's column {name!r} is replaced by the model's.")
        return [
            name for name in chunk.columns if name != self.target and name not in PREDICTION_COLUMNS
        ]

    def check_fits(self, table: Table, target: str) -> None:
        """RecipeInputError saying what differs when `table` cannot fine-tune the model this
        preprocessing belongs to: another target, other columns, or classes it lacks."""
        if target != self.target:
            raise RecipeInputError(
                f"The model being fine-tuned predicts {self.target!r}; set the target "
                f"parameter to {self.target!r}, not {target!r}, or train a new model."
            )
        specs = {spec["name"]: spec for spec in self.columns}
        inputs = [name for name in table.columns if name != target]
        problems = []
        if extra := [name for name in inputs if name not in specs]:
            problems.append(f"it has columns the model lacks: {_names(extra)}")
        if missing := [name for name in specs if name not in table.columns]:
            problems.append(f"it lacks columns the model needs: {_names(missing)}")
        if text := [
            name
            for name in inputs
            if name in specs
            and specs[name]["encoding"] == "standardize"
            and table.columns[name].dtype not in NUMERIC_DTYPES
        ]:
            problems.append(f"columns the model reads as numbers hold text: {_names(text)}")
        if target in table.columns:
            known = set(self.classes)
            values = table.columns[target].values
            new = {value for value in values if _is_label(value) and value not in known}
            if new:
                problems.append(f"it has classes the model lacks: {_names(sorted(new, key=str))}")
        if problems:
            raise RecipeInputError(
                f"The dataset does not fit the model being fine-tuned: {'; '.join(problems)}. "
                "Fine-tuning keeps the model's columns and classes; change the dataset to "
                "match, or train a new model."
            )


@dataclass(frozen=True)
class _ParentModel:
    """The model a fine-tune starts from: its config, weights and preprocessing, and a digest of
    its weights that ties a checkpoint to it."""

    config: dict[str, Any]
    preprocessing: Preprocessing
    weights: dict[str, torch.Tensor]
    digest: str

    @classmethod
    def load(cls, model_dir: Path) -> _ParentModel:
        from safetensors.torch import load_file

        config = _model_config(model_dir)
        weights_path = model_dir / WEIGHTS_FILENAME
        with weights_path.open("rb") as weights_file:
            digest = hashlib.file_digest(weights_file, "sha256").hexdigest()
        return cls(config, Preprocessing.from_config(config), load_file(weights_path), digest)


def _model_config(model_dir: Path) -> dict[str, Any]:
    config = json.loads((model_dir / CONFIG_FILENAME).read_text(encoding="utf-8"))
    return _checked_config(config)


def _checked_config(config: dict[str, Any]) -> dict[str, Any]:
    if config.get("recipe") != TabularClassifier.name:
        raise RecipeInputError(
            f"The model was made by the recipe {config.get('recipe')!r}, which "
            f"{TabularClassifier.name} cannot run."
        )
    return config


def _load_network(model_dir: Path, config: dict[str, Any], device: torch.device) -> nn.Module:
    from safetensors.torch import load_file

    model = _build_model(config["architecture"])
    model.load_state_dict(load_file(model_dir / WEIGHTS_FILENAME))
    return model.to(device)


def _row_value(row: Mapping[str, Any], where: str, spec: dict[str, Any]) -> Any:
    """The row's value for the column of `spec`, None when missing; RecipeInputError when the
    row lacks the column or its value is of another type."""
    name = spec["name"]
    if name not in row:
        raise RecipeInputError(f"{where} has no column {name!r}.")
    value = row[name]
    if value is None:
        return None
    if spec["encoding"] == "embedding":
        fits, expected = isinstance(value, str), "text"
    elif spec["dtype"] == "bool":
        fits, expected = isinstance(value, bool), "true or false"
    else:
        fits = isinstance(value, int | float) and not isinstance(value, bool)
        expected = "a number"
    if not fits:
        raise RecipeInputError(
            f"{where}, column {name!r}: expected {expected}, got {json.dumps(value, default=str)}."
        )
    return value


def _standardized(spec: dict[str, Any], value: Any) -> float:
    # A missing number becomes the training mean, which standardizes to 0.
    number = _number(value)
    return 0.0 if number is None else (number - spec["mean"]) / spec["std"]


def _vocabulary_index(spec: dict[str, Any]) -> dict[str, int]:
    """Each known value's embedding row; 0, the unknown row, is for the rest."""
    return {value: position for position, value in enumerate(spec["vocabulary"], 1)}


def _names(values: list[Any], most: int = 10) -> str:
    shown = ", ".join(repr(value) for value in values[:most])
    return shown if len(values) <= most else f"{shown} and {len(values) - most} more"


def _cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _fit_column(name: str, dtype: str, values: list[Any], rows: list[int]) -> dict[str, Any]:
    if dtype in NUMERIC_DTYPES:
        numbers = [x for row in rows if (x := _number(values[row])) is not None] or [0.0]
        mean = math.fsum(numbers) / len(numbers)
        std = math.sqrt(math.fsum((x - mean) ** 2 for x in numbers) / len(numbers))
        # A constant (or empty) column carries nothing; dividing by 1 keeps it at 0, not NaN.
        return {
            "name": name,
            "dtype": dtype,
            "encoding": "standardize",
            "mean": mean,
            "std": std if std > 1e-12 else 1.0,
        }
    counts = Counter(str(values[row]) for row in rows if values[row] is not None)
    ranked = sorted(counts, key=lambda value: (-counts[value], value))[:MAX_VOCABULARY]
    return {"name": name, "dtype": dtype, "encoding": "embedding", "vocabulary": ranked}


def _number(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _matrix(columns: list[list[Any]], rows: int, dtype: torch.dtype) -> torch.Tensor:
    import torch

    if not columns:
        return torch.zeros((rows, 0), dtype=dtype)
    return torch.tensor(columns, dtype=dtype).T.contiguous()


def _labelled_rows(table: Table, target: str) -> list[int]:
    """The rows with a target value."""
    if target not in table.columns:
        if target in table.ignored:
            raise RecipeInputError(
                f"The target column {target!r} has the type {table.ignored[target]}, which "
                "cannot be predicted as classes."
            )
        raise RecipeInputError(
            f"The dataset has no column {target!r}; its columns are: {', '.join(table.columns)}."
        )
    return [row for row, value in enumerate(table.columns[target].values) if _is_label(value)]


def _is_label(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and not math.isfinite(value))


def _split(rows: list[int], parameters: dict[str, Any], seed: int) -> tuple[list[int], list[int]]:
    """(training rows, validation rows), drawn by the seed."""
    import torch

    if len(rows) < 2:
        raise RecipeInputError(
            f"The dataset has {len(rows)} rows with a value in the target column; "
            "training and validation need at least two."
        )
    generator = torch.Generator().manual_seed(derived_seed(seed, 0))
    order = [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]
    validation = max(1, round(len(rows) * parameters["validation_fraction"]))
    return order[validation:], order[:validation]


def _build_model(architecture: dict[str, Any]) -> nn.Module:
    return _network_class()(architecture)


@functools.cache
def _network_class() -> type[nn.Module]:
    """The network's class, defined on first use so that importing this module needs no torch;
    a module with its own forward, as DistributedDataParallel wraps one."""
    import torch
    from torch import nn

    class TabularNetwork(nn.Module):
        """One embedding per text column, concatenated with the numbers, into an MLP."""

        def __init__(self, architecture: dict[str, Any]) -> None:
            super().__init__()
            embedding_dim = architecture["embedding_dim"]
            self.embeddings = nn.ModuleList(
                nn.Embedding(size, embedding_dim) for size in architecture["embedding_sizes"]
            )
            width = architecture["numeric_features"] + len(self.embeddings) * embedding_dim
            layers: list[nn.Module] = []
            for hidden in architecture["hidden_sizes"]:
                layers += [nn.Linear(width, hidden), nn.ReLU()]
                width = hidden
            layers.append(nn.Linear(width, architecture["classes"]))
            self.mlp = nn.Sequential(*layers)

        def forward(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
            embedded = [embedding(categorical[:, i]) for i, embedding in enumerate(self.embeddings)]
            return self.mlp(torch.cat([numeric, *embedded], dim=1))

    return TabularNetwork


def _predict_logits(
    model: nn.Module, numeric: torch.Tensor, categorical: torch.Tensor
) -> torch.Tensor:
    import torch

    model.eval()
    with torch.no_grad(), autocast(numeric.device):
        chunks = [
            model(
                numeric[start : start + EVAL_CHUNK_ROWS],
                categorical[start : start + EVAL_CHUNK_ROWS],
            ).float()
            for start in range(0, len(numeric), EVAL_CHUNK_ROWS)
        ]
    model.train()
    return torch.cat(chunks)


def _classification_metrics(
    logits: torch.Tensor, target: torch.Tensor, classes: int
) -> dict[str, float | None]:
    """loss, accuracy, macro F1 and ROC-AUC (binary, or one-vs-rest macro over the classes that
    have both positive and negative rows); roc_auc is None when no class has both."""
    import torch.nn.functional as F

    predicted = logits.argmax(dim=1)
    probabilities = logits.double().softmax(dim=1)
    if classes == 2:
        roc_auc = _binary_roc_auc(probabilities[:, 1], target == 1)
    else:
        per_class = [_binary_roc_auc(probabilities[:, c], target == c) for c in range(classes)]
        defined = [auc for auc in per_class if auc is not None]
        roc_auc = sum(defined) / len(defined) if defined else None
    return {
        "loss": F.cross_entropy(logits, target).item(),
        "accuracy": (predicted == target).double().mean().item(),
        "f1_macro": _macro_f1(predicted, target, classes),
        "roc_auc": roc_auc,
    }


def _macro_f1(predicted: torch.Tensor, target: torch.Tensor, classes: int) -> float:
    """The mean F1 over the classes that occur in the targets or the predictions."""
    confusion = (target * classes + predicted).bincount(minlength=classes * classes)
    confusion = confusion.reshape(classes, classes).double()
    true_positives = confusion.diagonal()
    actual, guessed = confusion.sum(dim=1), confusion.sum(dim=0)
    present = (actual + guessed) > 0
    f1 = 2 * true_positives[present] / (actual[present] + guessed[present])
    return f1.mean().item()


def _binary_roc_auc(scores: torch.Tensor, positive: torch.Tensor) -> float | None:
    """The Mann-Whitney form: the chance that a positive row outscores a negative one, with ties
    counted half, from the rank sum of the positives (tied scores share their mean rank)."""
    import torch

    positives = int(positive.sum())
    negatives = len(positive) - positives
    if not positives or not negatives:
        return None
    sorted_scores, order = torch.sort(scores)
    _, group, counts = torch.unique_consecutive(
        sorted_scores, return_inverse=True, return_counts=True
    )
    last_rank = counts.cumsum(dim=0).double()
    mean_rank = (last_rank - (counts - 1) / 2)[group]
    rank_sum = mean_rank[positive[order]].sum().item()
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


class _Trainer(Trainer):
    """The tabular classifier's training run (see Trainer).

    Under data parallelism DistributedDataParallel averages the gradients and rank 0 alone
    evaluates and sends the validation metrics to the other ranks, so every rank takes the same
    decisions and rank 0's checkpoint resumes all of them.
    """

    recipe = TabularClassifier

    def __init__(
        self,
        ctx: RecipeContext,
        preprocessing: Preprocessing,
        architecture: dict[str, Any],
        train: Encoded,
        val: Encoded,
        parent: _ParentModel | None,
    ) -> None:
        from torch.utils.data import DistributedSampler

        super().__init__(ctx)
        self.preprocessing = preprocessing
        self.architecture = architecture
        self.parent = parent
        self.train_data, self.val_data = train.to(self.device), val.to(self.device)
        # Each epoch's order is seeded by the epoch alone, so a resumed run draws the same
        # order mid-epoch; each rank trains on its share of it (one rank: all of it).
        self.sampler = DistributedSampler(
            range(len(train.target)),
            num_replicas=ctx.world_size,
            rank=ctx.rank,
            shuffle=True,
            seed=derived_seed(ctx.seed, 1),
        )
        self.batches = math.ceil(len(self.sampler) / self.batch_size)
        self._start_model(_build_model, architecture, self.parameters["learning_rate"])
        if parent is not None:
            self.model.load_state_dict(parent.weights)
        self.network = self.model
        if ctx.world_size > 1:
            from jobs.recipes.distributed import wrap

            self.network = wrap(self.model)

    def _epoch_order(self) -> torch.Tensor:
        import torch

        self.sampler.set_epoch(self.epoch)
        return torch.tensor(list(self.sampler), dtype=torch.int64, device=self.device)

    def _train_step(self, rows: torch.Tensor) -> None:
        import torch.nn.functional as F

        with self.autocast:
            logits = self.network(self.train_data.numeric[rows], self.train_data.categorical[rows])
        self._step(F.cross_entropy(logits.float(), self.train_data.target[rows]))

    def _val_metrics(self) -> dict[str, float | None]:
        """The validation metrics, measured by rank 0 and the same on every rank."""
        metrics = None
        if self.ctx.is_main:
            logits = _predict_logits(self.model, self.val_data.numeric, self.val_data.categorical)
            metrics = _classification_metrics(
                logits, self.val_data.target, self.architecture["classes"]
            )
        if self.ctx.world_size == 1:
            return metrics
        from jobs.recipes.distributed import broadcast_floats

        # roc_auc may be None (undefined); it travels as NaN.
        sent = [
            math.nan if metrics is None or metrics[name] is None else metrics[name]
            for name in _VAL_METRICS
        ]
        received = dict(zip(_VAL_METRICS, broadcast_floats(sent), strict=True))
        if math.isnan(received["roc_auc"]):
            received["roc_auc"] = None
        return received

    def _result(self) -> RecipeResult:
        artifacts = self._write_best_model(self.preprocessing.config(self.architecture))
        # A fine-tune keeps its model's layers, whatever the parameters asked for.
        parameters = None
        if self.parent is not None:
            parameters = self.parameters | {
                "hidden_sizes": self.architecture["hidden_sizes"],
                "embedding_dim": self.architecture["embedding_dim"],
            }
        return RecipeResult(
            self._best_epoch_metrics(),
            artifacts,
            self.preprocessing.input_signature(),
            parameters=parameters,
        )

    def _identity(self) -> dict[str, Any]:
        identity = {
            "classes": self.preprocessing.classes,
            "rows": [len(self.train_data.target), len(self.val_data.target)],
        }
        # Added only where they apply, so checkpoints of plain one-process runs keep matching.
        if self.ctx.world_size > 1:  # the shards, and so the steps, depend on it
            identity["processes"] = self.ctx.world_size
        if self.parent is not None:
            identity["parent_weights"] = self.parent.digest
        return identity
