"""The text classifier recipe: one text column split into lowercase word and punctuation tokens,
a vocabulary fitted on the training rows, and either a bag of embeddings (their mean, normalized,
into a linear layer) or a small transformer encoder that predicts a class column.

A run is a pure function of (data, parameters, seed): the split, each epoch's shuffle and the
transformer's dropout are drawn from seeded generators whose state goes into every checkpoint, so
a resumed run ends with the same weights as one that was never interrupted (bit for bit on the
CPU). The vocabulary lives in config.json as a list of tokens; nothing is pickled. torch is
imported inside the functions, because the web process imports this module to validate parameters.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain, islice
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
    online_input_object,
)
from jobs.recipes.data import NULL_MARKERS, csv_chunks, dataset_row_count
from jobs.recipes.training import Trainer, autocast, derived_seed

if TYPE_CHECKING:
    import torch
    from torch import nn

# A model remembers which tokenizer cut its training text; another one would give other ids.
TOKENIZER = "lowercase-words-and-punctuation/1"
TOKEN_PATTERN = re.compile(r"\w+|[^\w\s]")
SPECIAL_TOKENS = ["<pad>", "<unk>"]
PAD, UNKNOWN = 0, 1
MAX_CLASSES = 1_000
DEFAULT_LEARNING_RATES = {"embedding_bag": 1e-3, "transformer": 3e-4}
EMBEDDING_INIT_STD = 0.02
TRANSFORMER_LAYERS = 2
TRANSFORMER_DROPOUT = 0.1
# Rows read at a time where the context does not say (ctx.chunk_rows).
READ_CHUNK_ROWS = 10_000
# Rows per forward pass outside training: a transformer's attention grows with rows x length^2.
INFERENCE_BATCH_ROWS = 256
PREDICTION_COLUMNS = ("prediction", "probability")


class TextClassifier(Recipe):
    name = "text-classifier"
    version = "1.0"
    kind = "train"
    dataset_formats = ("csv", "parquet")
    online = True
    parameter_schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Text classifier",
        "description": (
            "Predicts a class column from a text column (reviews, tickets, messages). The text "
            "is split into lowercase words and punctuation; a vocabulary is learned from the "
            "training rows."
        ),
        "type": "object",
        "additionalProperties": False,
        "required": ["text_column", "target"],
        "properties": {
            "text_column": {
                "type": "string",
                "minLength": 1,
                "title": "Text column",
                "description": "The column holding the text to classify.",
            },
            "target": {
                "type": "string",
                "minLength": 1,
                "title": "Target column",
                "description": "The column holding each row's class.",
            },
            "model": {
                "enum": ["embedding_bag", "transformer"],
                "default": "embedding_bag",
                "title": "Model",
                "description": (
                    "embedding_bag averages the tokens' embeddings (fast, ignores word order); "
                    "transformer is a small two-layer encoder with learned positions."
                ),
            },
            "max_vocab": {
                "type": "integer",
                "minimum": 1,
                "maximum": 1_000_000,
                "default": 20_000,
                "title": "Vocabulary size",
                "description": "The most distinct tokens kept, most frequent first; others are "
                "unknown.",
            },
            "min_freq": {
                "type": "integer",
                "minimum": 1,
                "maximum": 1_000_000,
                "default": 2,
                "title": "Minimum token count",
                "description": "A token enters the vocabulary only if the training rows hold it "
                "this many times.",
            },
            "max_length": {
                "type": "integer",
                "minimum": 1,
                "maximum": 4096,
                "default": 256,
                "title": "Maximum length",
                "description": "Tokens read from each text; the rest is cut off.",
            },
            "embedding_dim": {
                "type": "integer",
                "minimum": 1,
                "maximum": 1024,
                "default": 64,
                "title": "Embedding size",
                "description": "Length of the vector learned for each token.",
            },
            "epochs": {
                "type": "integer",
                "minimum": 1,
                "maximum": 1000,
                "default": 10,
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
                "title": "Learning rate",
                "description": "Adam's step size; when left out, 0.001 for embedding_bag and "
                "0.0003 for transformer.",
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
                "default": 3,
                "title": "Early stopping patience",
                "description": (
                    "Stop after this many epochs without a better validation loss and keep the "
                    "best epoch's weights; 0 trains every epoch."
                ),
            },
        },
    }

    def train(self, ctx: RecipeContext) -> RecipeResult | None:
        _require_new_single_process_run(ctx)
        parameters = ctx.parameters
        text_column, target = parameters["text_column"], parameters["target"]
        if text_column == target:
            raise RecipeInputError("text_column and target name the same column; choose two.")
        texts, labels = _read_labelled(ctx, text_column, target)
        train_rows, val_rows = _split(len(labels), parameters["validation_fraction"], ctx.seed)
        tokenizer = Tokenizer.fit(
            (texts[row] for row in train_rows),
            max_vocab=parameters["max_vocab"],
            min_freq=parameters["min_freq"],
            max_length=parameters["max_length"],
        )
        classes = _classes(labels[row] for row in train_rows)
        class_index = {label: index for index, label in enumerate(classes)}
        val_rows_known = [row for row in val_rows if labels[row] in class_index]
        if len(val_rows_known) < len(val_rows):
            ctx.log(
                f"{len(val_rows) - len(val_rows_known)} validation rows have a class no "
                "training row has; left out."
            )
        if not val_rows_known:
            raise RecipeInputError(
                "No validation row has a class that the training rows have; "
                "upload more rows per class."
            )
        train, val = (
            Encoded.of(
                [tokenizer.ids(texts[row]) for row in rows],
                [class_index[labels[row]] for row in rows],
            )
            for rows in (train_rows, val_rows_known)
        )
        model = parameters["model"]
        learning_rate = parameters.get("learning_rate", DEFAULT_LEARNING_RATES[model])
        ctx.log(
            f"Training the {model} model on {len(train)} rows, validating on {len(val)}; "
            f"{len(classes)} classes, {len(tokenizer.vocabulary)} tokens in the vocabulary; "
            f"learning rate {learning_rate:g}; device {ctx.devices[0]}."
        )
        architecture = _architecture(parameters, len(tokenizer.vocabulary), len(classes))
        config = {
            "recipe": TextClassifier.name,
            "recipe_version": TextClassifier.version,
            "architecture": architecture,
            "text_column": text_column,
            "target": target,
            "classes": classes,
            "learning_rate": learning_rate,
            "tokenizer": TOKENIZER,
            "vocabulary": tokenizer.vocabulary,
        }
        return _Trainer(ctx, config, train, val).run()

    def validation_outcomes(
        self, ctx: RecipeContext, *, model_dirs: dict[str, Path], split_seed: int, slice_column: str
    ) -> tuple[dict[str, list[bool]], list[str | None]]:
        """For the evaluation gate: whether each model in `model_dirs` (by role) predicted each
        validation row right, and each row's value of `slice_column` (None when the dataset lacks
        it). The rows are those a training run of `ctx.parameters` seeded with `split_seed` held
        out; a class a model does not know counts as a wrong answer."""
        from dataclasses import replace

        text_column, target = ctx.parameters["text_column"], ctx.parameters["target"]
        texts: list[str] = []
        labels: list[str] = []
        slices: list[str | None] = []
        for header, chunk in _read_chunks(ctx):
            text_at, target_at = _positions(header, [text_column, target])
            slice_at = header.index(slice_column) if slice_column in header else None
            for row in chunk:
                label = _cell(row[target_at])
                if label is not None:
                    texts.append(_cell(row[text_at]) or "")
                    labels.append(label)
                    slices.append(None if slice_at is None else _cell(row[slice_at]) or "")
        _train_rows, rows = _split(len(labels), ctx.parameters["validation_fraction"], split_seed)
        outcomes = {}
        for role, model_dir in model_dirs.items():
            model, config, tokenizer, device = _load_model(replace(ctx, model_dir=model_dir))
            data = Encoded.of([tokenizer.ids(texts[row]) for row in rows]).to(device)
            predicted = _logits(model, config["architecture"], data).argmax(dim=1).tolist()
            outcomes[role] = [
                config["classes"][label] == labels[row]
                for label, row in zip(predicted, rows, strict=True)
            ]
        return outcomes, [slices[row] for row in rows]

    def evaluate(self, ctx: RecipeContext) -> dict[str, Any]:
        import torch
        import torch.nn.functional as F

        model, config, tokenizer, device = _load_model(ctx)
        classes = len(config["classes"])
        class_index = {label: index for index, label in enumerate(config["classes"])}
        confusion = torch.zeros((classes, classes), dtype=torch.int64)
        loss_sum, rows, unknown = 0.0, 0, 0
        for header, chunk in _read_chunks(ctx):
            text_at, target_at = _positions(header, [config["text_column"], config["target"]])
            labelled = [
                (row, label) for row in chunk if (label := _cell(row[target_at])) is not None
            ]
            known = [(row, label) for row, label in labelled if label in class_index]
            unknown += len(labelled) - len(known)
            if not known:
                continue
            data = Encoded.of(
                [tokenizer.ids(_cell(row[text_at]) or "") for row, _ in known],
                [class_index[label] for _, label in known],
            ).to(device)
            logits = _logits(model, config["architecture"], data).cpu()
            loss_sum += F.cross_entropy(logits, data.target.cpu(), reduction="sum").item()
            confusion += _confusion(logits.argmax(dim=1), data.target.cpu(), classes)
            rows += len(known)
        if not rows:
            raise RecipeInputError("No row of the dataset has a class the model knows.")
        return {
            "loss": loss_sum / rows,
            **_confusion_metrics(confusion),
            "rows": rows,
            "rows_with_unknown_class": unknown,
        }

    def predict(self, ctx: RecipeContext) -> RecipeResult | None:
        """Write predictions.csv: the input's columns but the target (and any named like the
        prediction columns), then each row's most likely class and its probability, row by row
        in the input's order. Rows stream through in chunks, so memory stays flat; the file
        appears only once complete."""
        import torch

        model, config, tokenizer, device = _load_model(ctx)
        total = dataset_row_count(ctx.dataset_path, ctx.dataset_format)
        ctx.output_dir.mkdir(parents=True, exist_ok=True)
        path = ctx.output_dir / PREDICTIONS_FILENAME
        partial = path.with_name(f".{path.name}.partial")
        rows = 0
        try:
            with partial.open("w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                kept: list[int] | None = None
                for header, chunk in _read_chunks(ctx):
                    if ctx.should_stop():
                        return None
                    [text_at] = _positions(header, [config["text_column"]])
                    if kept is None:
                        kept = [
                            index
                            for index, name in enumerate(header)
                            if name != config["target"] and name not in PREDICTION_COLUMNS
                        ]
                        writer.writerow([header[index] for index in kept] + [*PREDICTION_COLUMNS])
                    if not chunk:
                        continue
                    data = Encoded.of(
                        [tokenizer.ids(_cell(row[text_at]) or "") for row in chunk]
                    ).to(device)
                    probability, predicted = torch.softmax(
                        _logits(model, config["architecture"], data).double(), dim=1
                    ).max(dim=1)
                    for row, label, chance in zip(
                        chunk, predicted.tolist(), probability.tolist(), strict=True
                    ):
                        writer.writerow(
                            [_output_cell(row[index]) for index in kept]
                            + [config["classes"][label], f"{chance:.6f}"]
                        )
                    rows += len(chunk)
                    ctx.progress(rows, total, 1)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        ctx.log(f"Predicted {rows} rows.")
        relative = path.resolve().relative_to(ctx.workdir.resolve()).as_posix()
        return RecipeResult({"rows": rows}, {PREDICTIONS_FILENAME: relative}, {})

    @classmethod
    def online_predictor(cls, model_dir: Path, device: str = "cpu") -> OnlinePredictor:
        """Inputs are `{"text": "..."}`, tokenized as the training text was; outputs
        `{"label": class, "probabilities": {class: p}}`."""
        import torch

        model, config, tokenizer, target = _load_model_dir(model_dir, torch.device(device))

        def predict(inputs: list[Any]) -> list[dict[str, Any]]:
            if not inputs:
                return []
            ids = [
                tokenizer.ids(online_input_object(item, position, "text", str, "text"))
                for position, item in enumerate(inputs)
            ]
            logits = _logits(model, config["architecture"], Encoded.of(ids).to(target))
            probabilities = torch.softmax(logits.double(), dim=1).tolist()
            return class_probabilities(config["classes"], probabilities)

        return predict


def _require_new_single_process_run(ctx: RecipeContext) -> None:
    if ctx.model_dir is not None:
        raise RecipeInputError(
            "The text classifier cannot fine-tune a trained model yet; train a new one."
        )
    if getattr(ctx, "world_size", 1) > 1:
        raise RecipeInputError(
            "The text classifier trains in one process on one device; submit it with one GPU."
        )


def tokenize(text: str) -> list[str]:
    return TOKEN_PATTERN.findall(text.lower())


@dataclass
class Tokenizer:
    """Token ids for texts: the vocabulary's position of each token, UNKNOWN for the rest."""

    vocabulary: list[str]
    max_length: int
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._index = {token: index for index, token in enumerate(self.vocabulary)}

    @classmethod
    def fit(
        cls, texts: Iterable[str], *, max_vocab: int, min_freq: int, max_length: int
    ) -> Tokenizer:
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(tokenize(text))
        kept = sorted(
            (t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t)
        )
        return cls(SPECIAL_TOKENS + kept[:max_vocab], max_length)

    def ids(self, text: str) -> list[int]:
        """The first max_length tokens' ids; an empty text reads as one unknown token, so that
        every row has something to average or attend to."""
        matches = islice(TOKEN_PATTERN.finditer(text.lower()), self.max_length)
        return [self._index.get(match.group(), UNKNOWN) for match in matches] or [UNKNOWN]


@dataclass
class Encoded:
    """Rows of token ids of different lengths, stored end to end (row i is
    tokens[offsets[i]:offsets[i + 1]]) so that memory follows the text, not the longest row,
    and their class indices (none for rows to predict)."""

    tokens: torch.Tensor
    offsets: torch.Tensor
    target: torch.Tensor

    @classmethod
    def of(cls, ids: list[list[int]], target: list[int] | None = None) -> Encoded:
        import torch

        lengths = torch.tensor([len(row) for row in ids], dtype=torch.int64)
        return cls(
            tokens=torch.tensor(list(chain.from_iterable(ids)), dtype=torch.int64),
            offsets=torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(dim=0)]),
            target=torch.tensor(target or [], dtype=torch.int64),
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def to(self, device: torch.device) -> Encoded:
        return Encoded(self.tokens.to(device), self.offsets.to(device), self.target.to(device))

    def padded(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows' ids as a (rows, longest of them) matrix, PAD after each row's end."""
        import torch

        starts = self.offsets[rows]
        lengths = self.offsets[rows + 1] - starts
        positions = torch.arange(int(lengths.max()), device=starts.device)
        index = (starts[:, None] + positions).clamp(max=len(self.tokens) - 1)
        return torch.where(positions < lengths[:, None], self.tokens[index], PAD)


def _classes(labels: Iterable[str]) -> list[str]:
    counts = Counter(labels)
    if len(counts) < 2:
        raise RecipeInputError(
            "The target column has a single class among the training rows; a classifier needs "
            "at least two."
        )
    if len(counts) > MAX_CLASSES:
        raise RecipeInputError(
            f"The target column has {len(counts):,} distinct values, more than the "
            f"{MAX_CLASSES:,} classes this recipe predicts."
        )
    return sorted(counts)


def _split(rows: int, validation_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training rows, validation rows), drawn by the seed."""
    import torch

    if rows < 2:
        raise RecipeInputError(
            f"The dataset has {rows} rows with a class; training and validation need at least two."
        )
    generator = torch.Generator().manual_seed(derived_seed(seed, 0))
    order = torch.randperm(rows, generator=generator).tolist()
    validation = max(1, round(rows * validation_fraction))
    return order[validation:], order[:validation]


# Reading


def _read_chunks(ctx: RecipeContext) -> Iterator[tuple[list[str], list[list[Any]]]]:
    """(header, rows) for each chunk of at most ctx.chunk_rows rows of the dataset; at least
    one, possibly empty, so that the header is known even for a table without rows. CSV cells
    are the raw strings, Parquet cells Python values."""
    chunk_rows = getattr(ctx, "chunk_rows", READ_CHUNK_ROWS)
    if ctx.dataset_format == "csv":
        return _csv_chunks(ctx, chunk_rows)
    if ctx.dataset_format == "parquet":
        return _parquet_chunks(ctx.dataset_path, chunk_rows)
    raise RecipeInputError(
        f"Datasets in the {ctx.dataset_format!r} format cannot be read as a table."
    )


def _csv_chunks(ctx: RecipeContext, chunk_rows: int) -> Iterator[tuple[list[str], list[list[Any]]]]:
    for chunk in csv_chunks(ctx.dataset_path, ctx.csv_dialect, chunk_rows=chunk_rows):
        yield chunk.names, [list(row) for row in zip(*chunk.columns, strict=True)]


def _parquet_chunks(path: Path, chunk_rows: int) -> Iterator[tuple[list[str], list[list[Any]]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        header = parquet.schema_arrow.names
        yield header, []
        for batch in parquet.iter_batches(batch_size=chunk_rows):
            columns = [column.to_pylist() for column in batch.columns]
            yield header, [list(row) for row in zip(*columns, strict=True)]
    except (pa.ArrowException, OSError) as exc:
        raise RecipeInputError(f"The Parquet file cannot be read: {exc}.") from exc


def _positions(header: list[str], names: list[str]) -> list[int]:
    for name in names:
        if name not in header:
            raise RecipeInputError(
                f"The dataset has no column {name!r}; its columns are: {', '.join(header)}."
            )
    return [header.index(name) for name in names]


def _cell(value: Any) -> str | None:
    """A cell as text, None when missing; the same text whether it came from a CSV or Parquet."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).strip()
    return None if text in NULL_MARKERS else text


def _output_cell(value: Any) -> Any:
    return "" if value is None else value


def _read_labelled(
    ctx: RecipeContext, text_column: str, target: str
) -> tuple[list[str], list[str]]:
    """Every row's text and class, leaving out rows without a class."""
    texts: list[str] = []
    labels: list[str] = []
    for header, chunk in _read_chunks(ctx):
        text_at, target_at = _positions(header, [text_column, target])
        for row in chunk:
            label = _cell(row[target_at])
            if label is not None:
                texts.append(_cell(row[text_at]) or "")
                labels.append(label)
    return texts, labels


# The model


def _architecture(parameters: dict[str, Any], vocabulary: int, classes: int) -> dict[str, Any]:
    dim = parameters["embedding_dim"]
    architecture = {
        "model": parameters["model"],
        "vocabulary": vocabulary,
        "embedding_dim": dim,
        "classes": classes,
        "max_length": parameters["max_length"],
    }
    if parameters["model"] == "transformer":
        architecture |= {
            "layers": TRANSFORMER_LAYERS,
            # Heads split the embedding evenly; four where the size allows.
            "heads": next(heads for heads in (4, 2, 1) if dim % heads == 0),
            "feedforward": 4 * dim,
            "dropout": TRANSFORMER_DROPOUT,
        }
    return architecture


def _build_model(architecture: dict[str, Any]) -> nn.ModuleDict:
    from torch import nn

    vocabulary, dim = architecture["vocabulary"], architecture["embedding_dim"]
    if architecture["model"] == "embedding_bag":
        return nn.ModuleDict(
            {
                "embedding": _small(nn.EmbeddingBag(vocabulary, dim, mode="mean", padding_idx=PAD)),
                # The mean of many tokens is small; normalized, the few telling ones among
                # them move the logits from the first steps on.
                "norm": nn.LayerNorm(dim),
                "classifier": nn.Linear(dim, architecture["classes"]),
            }
        )
    layer = nn.TransformerEncoderLayer(
        dim,
        architecture["heads"],
        dim_feedforward=architecture["feedforward"],
        dropout=architecture["dropout"],
        batch_first=True,
        norm_first=True,
    )
    return nn.ModuleDict(
        {
            "embedding": _small(nn.Embedding(vocabulary, dim, padding_idx=PAD)),
            "positions": _small(nn.Embedding(architecture["max_length"], dim)),
            # Pre-norm layers leave the last output unnormalized; the encoder's norm closes it.
            "encoder": nn.TransformerEncoder(
                layer,
                architecture["layers"],
                norm=nn.LayerNorm(dim),
                enable_nested_tensor=False,
            ),
            "classifier": nn.Linear(dim, architecture["classes"]),
        }
    )


def _small(embedding: nn.Embedding | nn.EmbeddingBag) -> nn.Embedding | nn.EmbeddingBag:
    """`embedding` with small initial vectors (PAD's stays zero): torch's N(0, 1) start makes
    the mean of a text's many uninformative tokens loud noise that takes many steps to quiet."""
    import torch

    with torch.no_grad():
        embedding.weight.normal_(0.0, EMBEDDING_INIT_STD)
        if embedding.padding_idx is not None:
            embedding.weight[embedding.padding_idx].zero_()
    return embedding


def _forward(model: nn.ModuleDict, architecture: dict[str, Any], ids: torch.Tensor) -> torch.Tensor:
    """Class logits for a (rows, length) matrix of token ids."""
    import torch

    if architecture["model"] == "embedding_bag":
        return model["classifier"](model["norm"](model["embedding"](ids)))
    padding = ids == PAD
    positions = torch.arange(ids.shape[1], device=ids.device)
    hidden = model["encoder"](
        model["embedding"](ids) + model["positions"](positions), src_key_padding_mask=padding
    )
    # The mean over each row's real tokens; Tokenizer.ids gives every row at least one.
    present = (~padding).unsqueeze(-1).to(hidden.dtype)
    return model["classifier"]((hidden * present).sum(dim=1) / present.sum(dim=1))


def _logits(model: nn.ModuleDict, architecture: dict[str, Any], data: Encoded) -> torch.Tensor:
    """Float32 logits of every row, a batch at a time, in evaluation mode."""
    import torch

    device = data.tokens.device
    model.eval()
    with torch.no_grad(), autocast(device):
        chunks = [
            _forward(
                model,
                architecture,
                data.padded(
                    torch.arange(start, min(start + INFERENCE_BATCH_ROWS, len(data)), device=device)
                ),
            ).float()
            for start in range(0, len(data), INFERENCE_BATCH_ROWS)
        ]
    model.train()
    return torch.cat(chunks)


def _load_model(
    ctx: RecipeContext,
) -> tuple[nn.ModuleDict, dict[str, Any], Tokenizer, torch.device]:
    import torch

    if ctx.model_dir is None:
        raise ValueError("Evaluation and prediction need ctx.model_dir, the trained model.")
    return _load_model_dir(ctx.model_dir, torch.device(ctx.devices[0]))


def _load_model_dir(
    model_dir: Path, device: torch.device
) -> tuple[nn.ModuleDict, dict[str, Any], Tokenizer, torch.device]:
    from safetensors.torch import load_file

    config = json.loads((model_dir / CONFIG_FILENAME).read_text(encoding="utf-8"))
    if config.get("recipe") != TextClassifier.name or config.get("tokenizer") != TOKENIZER:
        raise RecipeInputError("The model was not trained by this version of the text classifier.")
    architecture = config["architecture"]
    model = _build_model(architecture)
    model.load_state_dict(load_file(model_dir / WEIGHTS_FILENAME))
    model.to(device)
    tokenizer = Tokenizer(config["vocabulary"], architecture["max_length"])
    return model, config, tokenizer, device


def _signature(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "columns": [{"name": config["text_column"], "dtype": "string"}],
        "target": config["target"],
        "classes": config["classes"],
    }


# Metrics


def _confusion(predicted: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    """counts[true class, predicted class]."""
    counts = (target * classes + predicted).bincount(minlength=classes * classes)
    return counts.reshape(classes, classes)


def _confusion_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy, and macro F1: the mean F1 over the classes that occur in the targets or the
    predictions."""
    confusion = confusion.double()
    true_positives = confusion.diagonal()
    actual, guessed = confusion.sum(dim=1), confusion.sum(dim=0)
    present = (actual + guessed) > 0
    f1 = 2 * true_positives[present] / (actual[present] + guessed[present])
    return {
        "accuracy": (true_positives.sum() / confusion.sum()).item(),
        "f1_macro": f1.mean().item(),
    }


class _Trainer(Trainer):
    """The text classifier's training run (see Trainer); the transformer's dropout draws from
    torch's generators, whose state the checkpoints carry."""

    recipe = TextClassifier
    saves_random_state = True

    def __init__(
        self, ctx: RecipeContext, config: dict[str, Any], train: Encoded, val: Encoded
    ) -> None:
        super().__init__(ctx)
        self.config = config
        self.architecture = config["architecture"]
        self.train_data, self.val_data = train.to(self.device), val.to(self.device)
        self.batches = math.ceil(len(train) / self.batch_size)
        self._start_model(_build_model, self.architecture, config["learning_rate"])

    def _epoch_order(self) -> torch.Tensor:
        import torch

        generator = torch.Generator().manual_seed(derived_seed(self.ctx.seed, self.epoch + 1))
        return torch.randperm(len(self.train_data), generator=generator).to(self.device)

    def _train_step(self, rows: torch.Tensor) -> None:
        import torch.nn.functional as F

        with self.autocast:
            logits = _forward(self.model, self.architecture, self.train_data.padded(rows))
        self._step(F.cross_entropy(logits.float(), self.train_data.target[rows]))

    def _val_metrics(self) -> dict[str, float]:
        import torch.nn.functional as F

        logits = _logits(self.model, self.architecture, self.val_data)
        target = self.val_data.target
        return {
            "loss": F.cross_entropy(logits, target).item(),
            **_confusion_metrics(
                _confusion(logits.argmax(dim=1), target, self.architecture["classes"])
            ),
        }

    def _result(self) -> RecipeResult:
        artifacts = self._write_best_model(self.config)
        metrics = self._best_epoch_metrics() | {"vocabulary_size": self.architecture["vocabulary"]}
        return RecipeResult(metrics, artifacts, _signature(self.config))

    def _identity(self) -> dict[str, Any]:
        return {
            "classes": self.config["classes"],
            "vocabulary": len(self.config["vocabulary"]),
            "rows": [len(self.train_data), len(self.val_data)],
        }
