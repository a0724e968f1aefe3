"""The tabular classifier recipe: numeric columns standardized, text columns embedded, an MLP on
top, trained with Adam and early stopping on the validation loss.

A run is a pure function of (data, parameters, seed): the split and each epoch's shuffle come
from generators derived from the seed, so a run resumed from any checkpoint ends with the same
weights as one that was never interrupted (bit for bit on the CPU). torch is imported inside the
functions, because the web process imports this module to validate parameters.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jobs.recipes.base import (
    CONFIG_FILENAME,
    WEIGHTS_FILENAME,
    Recipe,
    RecipeContext,
    RecipeInputError,
    RecipeResult,
)
from jobs.recipes.data import Table, read_table

if TYPE_CHECKING:
    import torch
    from torch import nn

MAX_CLASSES = 1_000
# Rarer values of a text column share the unknown embedding, which bounds the model's size.
MAX_VOCABULARY = 10_000
EVAL_CHUNK_ROWS = 65_536
NUMERIC_DTYPES = frozenset({"int64", "float64", "bool"})
_SEED_STRIDE = 6_364_136_223_846_793_005  # spreads the per-epoch generator seeds apart


class TabularClassifier(Recipe):
    name = "tabular-classifier"
    version = "1.0"
    kind = "train"
    dataset_formats = ("csv", "parquet")
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
                "description": "Rows per optimizer step.",
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
        table = read_table(ctx.dataset_path, ctx.dataset_format)
        for name, column_type in table.ignored.items():
            ctx.log(f"Column {name!r} is not used: its type {column_type} is not supported.")
        target = ctx.parameters["target"]
        train_rows, val_rows = _split(_labelled_rows(table, target), ctx.parameters, ctx.seed)
        preprocessing = Preprocessing.fit(table, target, train_rows)
        train_data, _ = preprocessing.encode(table, train_rows)
        val_data, unknown = preprocessing.encode(table, val_rows)
        if unknown:
            ctx.log(f"{unknown} validation rows have a class no training row has; left out.")
        if not len(val_data.target):
            raise RecipeInputError(
                "No validation row has a class that the training rows have; "
                "upload more rows per class."
            )
        ctx.log(
            f"Training on {len(train_data.target)} rows, validating on {len(val_data.target)}; "
            f"{len(preprocessing.classes)} classes; device {ctx.devices[0]}."
        )
        return _Trainer(ctx, preprocessing, train_data, val_data).run()

    def evaluate(self, ctx: RecipeContext) -> dict[str, Any]:
        import torch
        from safetensors.torch import load_file

        if ctx.model_dir is None:
            raise ValueError("evaluate needs ctx.model_dir, the trained model's artifacts.")
        config = json.loads((ctx.model_dir / CONFIG_FILENAME).read_text(encoding="utf-8"))
        preprocessing = Preprocessing.from_config(config)
        table = read_table(ctx.dataset_path, ctx.dataset_format)
        data, unknown = preprocessing.encode(table, _labelled_rows(table, preprocessing.target))
        if not len(data.target):
            raise RecipeInputError("No row of the dataset has a class the model knows.")
        device = torch.device(ctx.devices[0])
        data = data.to(device)
        model = _build_model(config["architecture"])
        model.load_state_dict(load_file(ctx.model_dir / WEIGHTS_FILENAME))
        model.to(device)
        logits = _predict_logits(model, data)
        metrics = _classification_metrics(logits, data.target, len(config["classes"]))
        return {**metrics, "rows": len(data.target), "rows_with_unknown_class": unknown}


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
        numeric, categorical = [], []
        for spec in self.columns:
            column = table.columns.get(spec["name"])
            if column is None:
                raise RecipeInputError(f"The dataset has no column {spec['name']!r}.")
            values = [column.values[row] for row in known]
            if spec["encoding"] == "standardize":
                if column.dtype not in NUMERIC_DTYPES:
                    raise RecipeInputError(f"Column {spec['name']!r} must hold numbers.")
                mean, std = spec["mean"], spec["std"]
                # A missing number becomes the training mean, which standardizes to 0.
                numeric.append(
                    [0.0 if (x := _number(v)) is None else (x - mean) / std for v in values]
                )
            else:
                index = {value: position for position, value in enumerate(spec["vocabulary"], 1)}
                categorical.append([0 if v is None else index.get(str(v), 0) for v in values])
        encoded = Encoded(
            numeric=_matrix(numeric, len(known), torch.float32),
            categorical=_matrix(categorical, len(known), torch.int64),
            target=torch.tensor(
                [class_index[target_values[row]] for row in known], dtype=torch.int64
            ),
        )
        return encoded, len(rows) - len(known)


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
    generator = torch.Generator().manual_seed(_derived_seed(seed, 0))
    order = [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]
    validation = max(1, round(len(rows) * parameters["validation_fraction"]))
    return order[validation:], order[:validation]


def _derived_seed(seed: int, stream: int) -> int:
    return (seed * _SEED_STRIDE + stream) % 2**63


def _build_model(architecture: dict[str, Any]) -> nn.ModuleDict:
    from torch import nn

    embedding_dim = architecture["embedding_dim"]
    embeddings = nn.ModuleList(
        nn.Embedding(size, embedding_dim) for size in architecture["embedding_sizes"]
    )
    width = architecture["numeric_features"] + len(embeddings) * embedding_dim
    layers: list[nn.Module] = []
    for hidden in architecture["hidden_sizes"]:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, architecture["classes"]))
    return nn.ModuleDict({"embeddings": embeddings, "mlp": nn.Sequential(*layers)})


def _forward(
    model: nn.ModuleDict, numeric: torch.Tensor, categorical: torch.Tensor
) -> torch.Tensor:
    import torch

    embedded = [embedding(categorical[:, i]) for i, embedding in enumerate(model["embeddings"])]
    return model["mlp"](torch.cat([numeric, *embedded], dim=1))


def _amp_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision in bf16 on a GPU, fp16 where bf16 is missing; None (float32) on the CPU."""
    import torch

    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autocast(device: torch.device) -> torch.autocast:
    import torch

    dtype = _amp_dtype(device)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def _predict_logits(model: nn.ModuleDict, data: Encoded) -> torch.Tensor:
    import torch

    device = data.target.device
    model.eval()
    with torch.no_grad(), _autocast(device):
        chunks = [
            _forward(
                model,
                data.numeric[start : start + EVAL_CHUNK_ROWS],
                data.categorical[start : start + EVAL_CHUNK_ROWS],
            ).float()
            for start in range(0, len(data.target), EVAL_CHUNK_ROWS)
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


class _Trainer:
    """One training run's mutable state: where it is (epoch, batch, step), the optimizer and the
    best epoch so far; all of it goes into a checkpoint and comes back from one."""

    def __init__(
        self, ctx: RecipeContext, preprocessing: Preprocessing, train: Encoded, val: Encoded
    ) -> None:
        import torch

        self.ctx = ctx
        self.parameters = ctx.parameters
        self.preprocessing = preprocessing
        self.architecture = preprocessing.architecture(ctx.parameters)
        self.device = torch.device(ctx.devices[0])
        self.train_data, self.val_data = train.to(self.device), val.to(self.device)
        self.batch_size = self.parameters["batch_size"]
        self.batches = math.ceil(len(train.target) / self.batch_size)
        # The same initial weights for the same seed, whatever ran in this process before.
        torch.manual_seed(ctx.seed)
        self.model = _build_model(self.architecture).to(self.device)
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=self.parameters["learning_rate"]
        )
        self.autocast = _autocast(self.device)
        # bf16 has float32's range; only fp16 gradients need scaling to avoid underflow.
        self.scaler = torch.amp.GradScaler("cuda", enabled=_amp_dtype(self.device) == torch.float16)
        self.epoch = self.batch = self.step = 0
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.best_val_loss = math.inf
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.best_metrics: dict[str, Any] | None = None
        self.stale_epochs = 0
        if ctx.resume_state is not None:
            self._restore(ctx.resume_state)

    def run(self) -> RecipeResult | None:
        epochs = self.parameters["epochs"]
        total = epochs * self.batches
        while self.epoch < epochs:
            order = self._shuffled_rows()
            while self.batch < self.batches:
                if self.ctx.should_stop():
                    self.ctx.save_checkpoint(self._state(), self.step)
                    return None
                start = self.batch * self.batch_size
                self._train_step(order[start : start + self.batch_size])
                self.batch += 1
                self.step += 1
                self.ctx.progress(self.step, total, self.epoch + 1)
                if self.ctx.checkpoint_due():
                    self.ctx.save_checkpoint(self._state(), self.step)
            if self._end_epoch():
                break
        return self._result()

    def _shuffled_rows(self) -> torch.Tensor:
        import torch

        # Seeded by the epoch alone, so a resumed run draws the same order mid-epoch.
        generator = torch.Generator().manual_seed(_derived_seed(self.ctx.seed, self.epoch + 1))
        return torch.randperm(len(self.train_data.target), generator=generator).to(self.device)

    def _train_step(self, rows: torch.Tensor) -> None:
        import torch.nn.functional as F

        with self.autocast:
            logits = _forward(
                self.model, self.train_data.numeric[rows], self.train_data.categorical[rows]
            )
        loss = F.cross_entropy(logits.float(), self.train_data.target[rows])
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # Accumulated on the device, so the step does not wait for the GPU.
        self.loss_sum += loss.detach()

    def _end_epoch(self) -> bool:
        """Measure the epoch, keep the best weights; True when early stopping ends the run."""
        train_loss = (self.loss_sum / self.batches).item()
        metrics = _classification_metrics(
            _predict_logits(self.model, self.val_data),
            self.val_data.target,
            self.architecture["classes"],
        )
        if not (math.isfinite(train_loss) and math.isfinite(metrics["loss"])):
            raise RecipeInputError(
                f"The loss stopped being a finite number in epoch {self.epoch + 1}; "
                "lower the learning_rate."
            )
        self.ctx.log_metric(self.step, "loss", train_loss, "train")
        for name, value in metrics.items():
            if value is not None:
                self.ctx.log_metric(self.step, name, value, "val")
        self.epoch += 1
        self.batch = 0
        self.loss_sum.zero_()
        if metrics["loss"] < self.best_val_loss:
            self.best_val_loss = metrics["loss"]
            self.best_weights = {
                name: tensor.detach().clone() for name, tensor in self.model.state_dict().items()
            }
            self.best_metrics = {**metrics, "train_loss": train_loss, "epoch": self.epoch}
            self.stale_epochs = 0
            return False
        self.stale_epochs += 1
        patience = self.parameters["early_stopping_patience"]
        if patience and self.stale_epochs >= patience:
            self.ctx.log(
                f"Stopping early after epoch {self.epoch}: the validation loss has not improved "
                f"for {patience} epochs; keeping epoch {self.best_metrics['epoch']}."
            )
            return True
        return False

    def _result(self) -> RecipeResult:
        self.model.load_state_dict(self.best_weights)
        artifacts = self.ctx.write_artifacts(
            self.model.state_dict(), self.preprocessing.config(self.architecture)
        )
        best = self.best_metrics
        metrics = {
            "val_loss": best["loss"],
            "val_accuracy": best["accuracy"],
            "val_f1_macro": best["f1_macro"],
            "val_roc_auc": best["roc_auc"],
            "train_loss": best["train_loss"],
            "best_epoch": best["epoch"],
            "epochs_trained": self.epoch,
        }
        return RecipeResult(metrics, artifacts, self.preprocessing.input_signature())

    def _fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must match to continue this run rather than another one."""
        return {
            "recipe": TabularClassifier.name,
            "version": TabularClassifier.version,
            "parameters": self.parameters,
            "seed": self.ctx.seed,
            "classes": self.preprocessing.classes,
            "rows": [len(self.train_data.target), len(self.val_data.target)],
        }

    def _state(self) -> dict[str, Any]:
        return {
            "fingerprint": self._fingerprint(),
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loss_sum": self.loss_sum,
            "best_val_loss": self.best_val_loss,
            "best_weights": self.best_weights,
            "best_metrics": self.best_metrics,
            "stale_epochs": self.stale_epochs,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self._fingerprint():
            raise RecipeInputError(
                "The checkpoint belongs to a run with other parameters, data or seed; "
                "start the job again without it."
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler.is_enabled() and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]
        self.loss_sum = state["loss_sum"].to(self.device)
        self.best_val_loss = state["best_val_loss"]
        if state["best_weights"] is not None:
            self.best_weights = {
                name: tensor.to(self.device) for name, tensor in state["best_weights"].items()
            }
        self.best_metrics = state["best_metrics"]
        self.stale_epochs = state["stale_epochs"]
