"""The text classifier recipe in-process on the CPU: parameters, the tokenizer, training on the
sample reviews, determinism, exact resumption, evaluation, batch prediction and bad input."""

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
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
from jobs.recipes.text import TextClassifier, Tokenizer, tokenize
from jobs.samples.text import write_text_sample
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
FAST = {
    "text_column": "text",
    "target": "label",
    "epochs": 4,
    "batch_size": 32,
    "embedding_dim": 16,
    "learning_rate": 0.01,
}
TRANSFORMER = FAST | {"model": "transformer", "epochs": 3, "learning_rate": 0.003}
# The 600-row sample: 120 rows for validation, 480 for training in batches of 32.
BATCHES = 15


def make_context(
    workdir: Path, dataset: Path, parameters: dict, cls: type = RecipeContext, **overrides
) -> RecipeContext:
    settings = {"seed": 7} | overrides
    return recipe_context(TextClassifier, workdir, dataset, parameters, cls, **settings)


@pytest.fixture(autouse=True, scope="module")
def _like_the_child():
    """One thread (these models are tiny, the machine is shared) and, as the child does on the
    CPU, deterministic algorithms only."""
    with one_torch_thread(deterministic=True):
        yield


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    write_text_sample(path, rows=600, seed=3)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset) -> RecipeContext:
    """A model trained on the sample, for the tests that only read it."""
    workdir = tmp_path_factory.mktemp("trained")
    ctx = make_context(workdir, dataset, FAST)
    ctx.result = TextClassifier().train(ctx)
    return ctx


# Parameters


def test_validation_fills_the_defaults_and_leaves_the_learning_rate_to_the_model():
    resolved = validate_parameters(TextClassifier, {"text_column": "review", "target": "stars"})
    assert resolved == {
        "text_column": "review",
        "target": "stars",
        "model": "embedding_bag",
        "max_vocab": 20_000,
        "min_freq": 2,
        "max_length": 256,
        "embedding_dim": 64,
        "epochs": 10,
        "batch_size": 64,
        "validation_fraction": 0.2,
        "early_stopping_patience": 3,
    }


def test_missing_columns_are_reported_on_their_fields():
    with pytest.raises(RecipeParameterError) as caught:
        validate_parameters(TextClassifier, {})
    fields = caught.value.fields
    assert set(fields) == {"parameters.text_column", "parameters.target"}
    assert {message for messages in fields.values() for message in messages} == {
        "This parameter is required."
    }


@pytest.mark.parametrize(
    ("parameters", "field", "message"),
    [
        ({"max_vocab": "100"}, "parameters.max_vocab", "Must be a whole number."),
        ({"min_freq": True}, "parameters.min_freq", "Must be a whole number."),
        ({"max_length": 2.5}, "parameters.max_length", "Must be a whole number."),
        ({"embedding_dim": 0}, "parameters.embedding_dim", "Must be at least 1."),
        ({"model": "lstm"}, "parameters.model", "Must be one of: embedding_bag, transformer."),
        ({"learning_rate": "fast"}, "parameters.learning_rate", "Must be a number."),
        ({"text_column": ""}, "parameters.text_column", "Must not be empty."),
    ],
)
def test_wrong_values_name_the_field_and_the_rule(parameters, field, message):
    with pytest.raises(RecipeParameterError) as caught:
        validate_parameters(TextClassifier, {"text_column": "text", "target": "label"} | parameters)
    assert caught.value.fields == {field: [message]}


@pytest.mark.slow
def test_importing_the_recipe_and_validating_does_not_import_torch():
    probe = textwrap.dedent(
        """
        import sys
        from jobs.recipes.base import validate_parameters
        from jobs.recipes.text import TextClassifier
        import jobs.samples.text
        validate_parameters(TextClassifier, {"text_column": "t", "target": "y"})
        heavy = sorted(name for name in ("torch", "pyarrow", "safetensors") if name in sys.modules)
        print(",".join(heavy))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert run.stdout.strip() == ""


# The tokenizer


def test_tokens_are_lowercase_words_and_single_punctuation_marks():
    assert tokenize("Great kettle!! Won't leak, 10/10") == [
        "great", "kettle", "!", "!", "won", "'", "t", "leak", ",", "10", "/", "10",
    ]  # fmt: skip


def test_vocabulary_keeps_frequent_tokens_most_frequent_first_after_pad_and_unknown():
    texts = ["b a a", "c b a", "d"]
    tokenizer = Tokenizer.fit(texts, max_vocab=2, min_freq=2, max_length=3)
    assert tokenizer.vocabulary == ["<pad>", "<unk>", "a", "b"]
    assert tokenizer.ids("A b zzz c a") == [2, 3, 1]  # cut at max_length, unknown zzz
    assert tokenizer.ids("  ") == [1]  # nothing to read is one unknown token


# Training


def test_training_on_the_sample_reaches_high_validation_accuracy(trained):
    result = trained.result
    assert result.metrics["val_accuracy"] > 0.85
    assert result.metrics["val_f1_macro"] > 0.85
    assert result.metrics["epochs_trained"] == 4
    names = {(metric["split"], metric["name"]) for metric in events(trained, "metric")}
    assert names == {("train", "loss"), ("val", "loss"), ("val", "accuracy"), ("val", "f1_macro")}
    assert events(trained, "progress")[0] == {"step": 1, "total": 4 * BATCHES, "epoch": 1}
    assert result.input_signature == {
        "columns": [{"name": "text", "dtype": "string"}],
        "target": "label",
        "classes": ["negative", "neutral", "positive"],
    }


def test_artifacts_are_safetensors_and_a_config_with_the_vocabulary(trained):
    assert trained.result.artifacts == {
        "model.safetensors": "out/model.safetensors",
        "config.json": "out/config.json",
    }
    config = json.loads((trained.output_dir / "config.json").read_text())
    assert config["vocabulary"][:2] == ["<pad>", "<unk>"]
    assert "great" in config["vocabulary"]
    assert config["learning_rate"] == 0.01
    tensors = weights(trained)
    assert tensors["embedding.weight"].shape == (len(config["vocabulary"]), 16)
    assert torch.count_nonzero(tensors["embedding.weight"][0]) == 0  # <pad> stays zero


def test_the_transformer_learns_the_sample_too(tmp_path, dataset):
    ctx = make_context(tmp_path, dataset, TRANSFORMER)
    result = TextClassifier().train(ctx)
    assert result.metrics["val_accuracy"] > 0.85
    config = json.loads((ctx.output_dir / "config.json").read_text())
    assert config["architecture"]["heads"] == 4 and config["architecture"]["layers"] == 2
    assert weights(ctx)["positions.weight"].shape == (256, 16)


def test_same_seed_gives_identical_weights_and_another_seed_does_not(tmp_path, dataset, trained):
    again = make_context(tmp_path / "again", dataset, FAST)
    TextClassifier().train(again)
    assert_same_weights(weights(trained), weights(again))
    other = make_context(tmp_path / "other", dataset, FAST, seed=8)
    TextClassifier().train(other)
    assert not torch.equal(
        weights(trained)["classifier.weight"], weights(other)["classifier.weight"]
    )


def test_csv_and_parquet_of_the_same_table_train_the_same_model(tmp_path, dataset, trained):
    parquet_path = tmp_path / "reviews.parquet"
    pq.write_table(pa_csv.read_csv(dataset), parquet_path)
    ctx = make_context(tmp_path, parquet_path, FAST)
    TextClassifier().train(ctx)
    assert_same_weights(weights(trained), weights(ctx))


@pytest.mark.parametrize(
    ("parameters", "stops"),
    [
        pytest.param(FAST, [7], id="embedding-bag-mid-epoch"),
        pytest.param(FAST, [BATCHES, 2 * BATCHES + 4], id="embedding-bag-twice"),
        pytest.param(TRANSFORMER | {"epochs": 2}, [4, BATCHES + 3], id="transformer-dropout"),
    ],
)
def test_interrupted_and_resumed_run_ends_with_identical_weights(
    tmp_path, dataset, parameters, stops
):
    uninterrupted = make_context(tmp_path / "whole", dataset, parameters)
    expected = TextClassifier().train(uninterrupted)

    workdir, resume_state = tmp_path / "pieces", None
    for stop_at in stops:
        ctx = make_context(
            workdir, dataset, parameters, StopAfterStep, resume_state=resume_state, stop_at=stop_at
        )
        assert TextClassifier().train(ctx) is None
        [checkpoint] = events(ctx, "checkpoint")
        assert checkpoint["step"] == stop_at
        resume_state = load_checkpoint(workdir / checkpoint["path"])
    ctx = make_context(workdir, dataset, parameters, resume_state=resume_state)
    result = TextClassifier().train(ctx)

    assert_same_weights(weights(uninterrupted), weights(ctx))
    assert result.metrics == expected.metrics


def test_checkpoint_of_another_run_is_refused(tmp_path, dataset):
    ctx = make_context(tmp_path, dataset, FAST, StopAfterStep, stop_at=2)
    TextClassifier().train(ctx)
    state = load_checkpoint(tmp_path / events(ctx, "checkpoint")[-1]["path"])
    other = make_context(tmp_path, dataset, FAST | {"min_freq": 3}, resume_state=state)
    with pytest.raises(RecipeInputError, match="checkpoint belongs to a run with other"):
        TextClassifier().train(other)


# Evaluation and prediction


def test_evaluate_scores_the_model_on_a_fresh_sample(tmp_path, trained):
    fresh = tmp_path / "fresh.csv"
    write_text_sample(fresh, rows=300, seed=99)
    metrics = TextClassifier().evaluate(
        make_context(tmp_path, fresh, FAST, model_dir=trained.output_dir)
    )
    assert metrics["accuracy"] > 0.85 and metrics["f1_macro"] > 0.85
    assert metrics["rows"] == 300 and metrics["rows_with_unknown_class"] == 0


def test_predict_streams_every_row_in_order_with_class_and_probability(tmp_path, trained):
    fresh = tmp_path / "fresh.csv"
    write_text_sample(fresh, rows=250, seed=42)
    with fresh.open("a", encoding="utf-8") as handle:
        handle.write('"",neutral\n')  # an empty text still gets a prediction
    ctx = make_context(tmp_path, fresh, FAST, model_dir=trained.output_dir)
    ctx.chunk_rows = 64
    result = TextClassifier().predict(ctx)

    assert result.metrics == {"rows": 251}
    assert result.artifacts == {"predictions.csv": "out/predictions.csv"}
    rows = read_csv(tmp_path / "out" / "predictions.csv")
    source = read_csv(fresh)
    assert list(rows[0]) == ["text", "prediction", "probability"]
    assert [row["text"] for row in rows] == [row["text"] for row in source]
    assert {row["prediction"] for row in rows} <= {"negative", "neutral", "positive"}
    assert all(1 / 3 <= float(row["probability"]) <= 1 for row in rows)
    correct = sum(
        row["prediction"] == want["label"] for row, want in zip(rows, source, strict=True)
    )
    assert correct / len(rows) > 0.85
    assert events(ctx, "progress")[0] == {"step": 64, "total": None, "epoch": 1}  # a chunk
    assert not list((tmp_path / "out").glob(".*"))


def test_quoted_text_with_commas_quotes_and_line_breaks_is_read_whole(tmp_path, trained):
    texts = ['Great, "really" great!\nWould buy again.', "Awful; it broke.", 'He said ""ok""']
    path = tmp_path / "quoted.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["text", "label"], *([text, "x"] for text in texts)])
    ctx = make_context(tmp_path, path, FAST, model_dir=trained.output_dir)
    assert TextClassifier().predict(ctx).metrics == {"rows": 3}
    rows = read_csv(tmp_path / "out" / "predictions.csv")
    assert [row["text"] for row in rows] == texts
    assert [row["prediction"] for row in rows[:2]] == ["positive", "negative"]


def test_predict_reads_parquet_and_keeps_other_columns(tmp_path, trained):
    table = pa_csv.read_csv(trained.dataset_path).slice(0, 30)
    table = table.append_column("id", pa.array(range(30)))
    path = tmp_path / "batch.parquet"
    pq.write_table(table, path)
    ctx = make_context(tmp_path, path, FAST, model_dir=trained.output_dir)
    assert TextClassifier().predict(ctx).metrics == {"rows": 30}
    rows = read_csv(tmp_path / "out" / "predictions.csv")
    assert list(rows[0]) == ["text", "id", "prediction", "probability"]
    assert [row["id"] for row in rows] == [str(n) for n in range(30)]


def test_predict_asked_to_stop_leaves_no_predictions_file(tmp_path, trained):
    ctx = make_context(tmp_path, trained.dataset_path, FAST, model_dir=trained.output_dir)
    ctx.stop_event.set()
    assert TextClassifier().predict(ctx) is None
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


# Bad input


@pytest.mark.parametrize(
    ("content", "parameters", "message"),
    [
        ("body,label\nhi,a\n", {}, "no column 'text'; its columns are: body, label"),
        ("text,label\nhi,a\nho,b\n", {"target": "text"}, "name the same column"),
        ("text,label\nhi,a\nho,a\nhey,a\n", {}, "a single class"),
        ("text,label\nhi,\nho,NA\n", {}, "0 rows with a class"),
        ("text,label\nhi,a\nho\n", {}, "Row 3 has 1 columns but the header has 2"),
    ],
)
def test_data_problems_are_input_errors_in_words(tmp_path, content, parameters, message):
    path = tmp_path / "bad.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(RecipeInputError, match=message):
        TextClassifier().train(make_context(tmp_path, path, FAST | parameters))


def test_predict_names_a_missing_text_column(tmp_path, trained):
    path = tmp_path / "bad.csv"
    path.write_text("body\nhello\n", encoding="utf-8")
    ctx = make_context(tmp_path, path, FAST, model_dir=trained.output_dir)
    with pytest.raises(RecipeInputError, match="no column 'text'"):
        TextClassifier().predict(ctx)


def test_the_gate_scores_exactly_the_rows_the_training_run_held_out(tmp_path, dataset, trained):
    """Same seed, same split: the gate's accuracy on the held-out rows is the run's own
    validation accuracy; slices come from a column the model never read."""
    with dataset.open(newline="", encoding="utf-8") as source:
        rows = list(csv.reader(source))
    sliced = tmp_path / "sliced.csv"
    with sliced.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow([*rows[0], "region"])
        writer.writerows([*row, "eu" if i % 2 else "us"] for i, row in enumerate(rows[1:]))
    ctx = make_context(tmp_path, sliced, FAST)
    outcomes, slices = TextClassifier().validation_outcomes(
        ctx,
        model_dirs={"challenger": trained.output_dir},
        split_seed=trained.seed,
        slice_column="region",
    )
    correct = outcomes["challenger"]
    assert len(correct) == 120 and set(slices) == {"eu", "us"}
    assert sum(correct) / len(correct) == pytest.approx(trained.result.metrics["val_accuracy"])
    other, _ = TextClassifier().validation_outcomes(
        ctx, model_dirs={"x": trained.output_dir}, split_seed=trained.seed + 1, slice_column=""
    )
    assert other["x"] != correct  # another seed holds out other rows
