"""Recipes in-process: parameter validation, the registry, the dataset readers and the tabular
classifier's training, determinism, resumption, fine-tuning and artifacts, on the CPU."""

import ast
import csv
import json
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from jsonschema import Draft202012Validator
from safetensors.torch import load_file

from jobs.recipes.base import (
    RecipeContext,
    RecipeInputError,
    RecipeParameterError,
    load_checkpoint,
    validate_parameters,
)
from jobs.recipes.catalog import RecipeNotFound, get_recipe, list_recipes
from jobs.recipes.data import Column, cast_column, read_table, read_table_chunks
from jobs.recipes.tabular import (
    Preprocessing,
    TabularClassifier,
    _binary_roc_auc,
    _classification_metrics,
)
from jobs.runner.protocol import parse_line
from jobs.samples import write_tabular_sample
from tests.jobs.recipe_helpers import (
    StopAfterStep,
    assert_same_weights,
    events,
    one_torch_thread,
    recipe_context,
    weights,
)

REPO = Path(__file__).resolve().parents[2]
COLUMNS = ["x1", "x2", "color", "label"]
FAST = {
    "target": "label",
    "epochs": 6,
    "batch_size": 16,
    "hidden_sizes": [16],
    "learning_rate": 0.01,
}
# make_rows(300) has 289 labelled rows: 58 for validation, 231 for training in batches of 16.
BATCHES = 15


def make_rows(count: int, seed: int = 0) -> list[list]:
    """Rows whose label is a linear function of x1 and the color; x2 is noise, sometimes
    missing, and a few labels are missing."""
    rng = random.Random(seed)  # noqa: S311 (seeded test data)
    offsets = {"red": 1.5, "green": 0.0, "blue": -1.5}
    rows = []
    for index in range(count):
        color = rng.choice(list(offsets))
        x1 = round(rng.uniform(-2, 2), 4)
        label = "yes" if x1 + offsets[color] > 0 else "no"
        x2 = None if index % 13 == 0 else round(rng.gauss(0, 1), 4)
        rows.append([x1, x2, color, None if index % 29 == 0 else label])
    return rows


def write_csv(path: Path, rows: list[list], columns: list[str] = COLUMNS) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(["" if cell is None else cell for cell in row] for row in rows)
    return path


def make_context(
    workdir: Path, dataset: Path, parameters: dict, cls: type = RecipeContext, **overrides
) -> RecipeContext:
    settings = {"seed": 11} | overrides
    return recipe_context(TabularClassifier, workdir, dataset, parameters, cls, **settings)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These models are tiny: more threads only contend for a shared machine's cores."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("data") / "train.csv", make_rows(300))


# Parameters


def test_validation_fills_every_default():
    resolved = validate_parameters(TabularClassifier, {"target": "label", "epochs": 3})
    assert resolved == {
        "target": "label",
        "epochs": 3,
        "hidden_sizes": [64, 32],
        "batch_size": 64,
        "learning_rate": 0.001,
        "validation_fraction": 0.2,
        "early_stopping_patience": 5,
        "embedding_dim": 4,
    }


def test_filled_defaults_are_copies_not_the_schema_itself():
    resolved = validate_parameters(TabularClassifier, {"target": "label"})
    resolved["hidden_sizes"].append(8)
    assert TabularClassifier.parameter_schema["properties"]["hidden_sizes"]["default"] == [64, 32]


def test_unknown_parameter_is_rejected_by_name():
    with pytest.raises(RecipeParameterError) as caught:
        validate_parameters(TabularClassifier, {"target": "label", "epoch": 3})
    assert caught.value.code == "invalid_parameters"
    assert caught.value.status == 400
    [message] = caught.value.fields["parameters.epoch"]
    assert message.startswith("Unknown parameter; this recipe accepts: batch_size, ")


def test_missing_target_is_reported_on_its_field():
    with pytest.raises(RecipeParameterError) as caught:
        validate_parameters(TabularClassifier, {})
    assert caught.value.fields == {"parameters.target": ["This parameter is required."]}


@pytest.mark.parametrize(
    ("parameters", "field", "message"),
    [
        ({"epochs": "10"}, "parameters.epochs", "Must be a whole number."),
        ({"epochs": 2.0}, "parameters.epochs", "Must be a whole number."),
        ({"epochs": True}, "parameters.epochs", "Must be a whole number."),
        ({"epochs": 0}, "parameters.epochs", "Must be at least 1."),
        ({"epochs": 1001}, "parameters.epochs", "Must be at most 1000."),
        ({"learning_rate": 0}, "parameters.learning_rate", "Must be greater than 0."),
        ({"hidden_sizes": [64, 0]}, "parameters.hidden_sizes", "Item 2: must be at least 1."),
        ({"hidden_sizes": 64}, "parameters.hidden_sizes", "Must be a list."),
        ({"target": ""}, "parameters.target", "Must not be empty."),
    ],
)
def test_wrong_values_name_the_field_and_the_rule(parameters, field, message):
    with pytest.raises(RecipeParameterError) as caught:
        validate_parameters(TabularClassifier, {"target": "label"} | parameters)
    assert caught.value.fields == {field: [message]}


def test_parameters_must_be_an_object():
    with pytest.raises(RecipeParameterError) as caught:
        validate_parameters(TabularClassifier, ["target"])
    assert list(caught.value.fields) == ["parameters"]


@pytest.mark.parametrize("recipe", sorted(list_recipes()))
def test_every_recipe_schema_is_valid_and_its_defaults_pass_it(recipe):
    recipe_cls = get_recipe(recipe)
    schema = recipe_cls.parameter_schema
    Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    for name, spec in schema["properties"].items():
        assert spec["title"] and spec["description"], name
        if "default" in spec:
            assert Draft202012Validator(spec).is_valid(spec["default"]), name
    assert recipe_cls.kind == "train" and recipe_cls.dataset_formats
    Draft202012Validator.check_schema(recipe_cls.predict_parameter_schema)


def test_predicting_takes_no_training_parameters():
    assert validate_parameters(TabularClassifier, {}, task="predict") == {}
    with pytest.raises(RecipeParameterError) as caught:
        validate_parameters(TabularClassifier, {"target": "label"}, task="predict")
    assert list(caught.value.fields) == ["parameters.target"]


# Registry


def test_unknown_recipe_names_the_available_ones():
    with pytest.raises(RecipeNotFound) as caught:
        get_recipe("gpt-from-scratch")
    assert caught.value.code == "unknown_recipe"
    assert "tabular-classifier" in caught.value.fields["recipe"][0]


@pytest.mark.slow
def test_registry_and_validation_do_not_import_torch():
    probe = textwrap.dedent(
        """
        import sys
        from jobs.recipes.base import validate_parameters
        from jobs.recipes.catalog import get_recipe, list_recipes
        validate_parameters(get_recipe("tabular-classifier"), {"target": "y"})
        list_recipes()
        heavy = sorted(name for name in ("torch", "pyarrow", "safetensors") if name in sys.modules)
        print(",".join(heavy))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert run.stdout.strip() == ""


@pytest.mark.slow
def test_installed_packages_add_recipes_through_entry_points(tmp_path):
    """A package's `factory_saas.recipes` entry point adds a recipe; one that reuses a built-in's
    name is ignored."""
    (tmp_path / "acme_recipes.py").write_text(
        textwrap.dedent(
            """
            from jobs.recipes.tabular import TabularClassifier

            class Acme(TabularClassifier):
                name = "acme"

            class Impostor(TabularClassifier):
                pass
            """
        )
    )
    dist_info = tmp_path / "acme_recipes-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-recipes\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(
        "[factory_saas.recipes]\n"
        "acme = acme_recipes:Acme\n"
        "tabular-classifier = acme_recipes:Impostor\n"
    )
    probe = (
        "from jobs.recipes.catalog import list_recipes\n"
        "print({name: cls.__qualname__ for name, cls in list_recipes().items()})"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO,
        env={"PYTHONPATH": f"{tmp_path}:{REPO}", "PATH": ""},
        capture_output=True,
        text=True,
        check=True,
    )
    recipes = ast.literal_eval(run.stdout.strip())
    assert recipes["tabular-classifier"] == "TabularClassifier"
    assert recipes["acme"] == "Acme"
    assert "would replace a built-in" in run.stderr


# Dataset readers


def test_csv_reader_sniffs_the_delimiter_and_types_each_column(tmp_path):
    path = tmp_path / "semicolons.csv"
    path.write_text(
        "\ufeffid;price;active;city\n1;2.5;true;Oslo\n2;NA;False;\n3;4;TRUE;Bergen\n",
        encoding="utf-8",
    )
    table = read_table(path, "csv")
    assert {name: column.dtype for name, column in table.columns.items()} == {
        "id": "int64",
        "price": "float64",
        "active": "bool",
        "city": "string",
    }
    assert table.columns["price"].values == [2.5, None, 4.0]
    assert table.columns["active"].values == [True, False, True]
    assert table.columns["city"].values == ["Oslo", None, "Bergen"]
    assert table.row_count == 3


def test_parquet_reader_lists_columns_it_cannot_use(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(
        pa.table(
            {
                "n": pa.array([1, None], pa.int32()),
                "tag": pa.array(["a", "b"]).dictionary_encode(),
                "when": pa.array([0, 1], pa.timestamp("ms")),
            }
        ),
        path,
    )
    table = read_table(path, "parquet")
    assert table.columns["n"].dtype == "int64" and table.columns["n"].values == [1, None]
    assert table.columns["tag"].values == ["a", "b"]
    assert table.ignored == {"when": "timestamp[ms]"}


def test_chunks_hold_at_most_chunk_rows_and_keep_the_cells_text(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("id,price\n007,2.50\n2,NA\n\n3,4\n", encoding="utf-8")
    chunks = list(read_table_chunks(path, "csv", chunk_rows=2))
    assert [(chunk.first_row, chunk.row_count) for chunk in chunks] == [(0, 2), (2, 1)]
    assert chunks[0].columns["id"] == Column("id", "string", ["007", "2"])
    assert chunks[0].columns["price"].values == ["2.50", None]
    assert cast_column(chunks[1].columns["price"], "float64").values == [4.0]


def test_an_empty_csv_still_gives_one_chunk_with_its_columns(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("a,b\n", encoding="utf-8")
    [chunk] = read_table_chunks(path, "csv", chunk_rows=10)
    assert list(chunk.columns) == ["a", "b"] and chunk.row_count == 0


def test_parquet_chunks_keep_their_types_and_count_rows(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"n": [1, 2, 3], "flag": [True, None, False]}), path)
    chunks = list(read_table_chunks(path, "parquet", chunk_rows=2))
    assert [chunk.first_row for chunk in chunks] == [0, 2]
    assert chunks[0].columns["n"] == Column("n", "int64", [1, 2])
    assert cast_column(chunks[0].columns["flag"], "float64").values == [1.0, None]


@pytest.mark.parametrize(
    ("column", "dtype", "message"),
    [
        (
            Column("age", "string", ["1", "x"]),
            "float64",
            "Row 12 of the dataset, column 'age': 'x' is not a number.",
        ),
        (
            Column("ok", "string", ["yes"]),
            "bool",
            "Row 11 of the dataset, column 'ok': 'yes' is not true or false.",
        ),
        (Column("n", "float64", [1.5]), "int64", "column 'n': 1.5 is not a whole number."),
    ],
)
def test_a_cell_that_does_not_fit_its_type_is_named_by_row_and_column(column, dtype, message):
    with pytest.raises(RecipeInputError, match=re.escape(message)):
        cast_column(column, dtype, first_row=10)


def test_ragged_csv_is_an_input_error(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("a,b\n1,2\n3\n", encoding="utf-8")
    with pytest.raises(RecipeInputError, match="Row 3 has 1 columns but the header has 2"):
        read_table(path, "csv")


# Preprocessing and metrics


def test_preprocessing_fits_on_training_rows_and_imputes_and_maps_unknowns(tmp_path):
    path = write_csv(
        tmp_path / "small.csv",
        [[1.0, 5, "a", "p"], [3.0, 6, "b", "q"], [None, 7, "a", "p"], [100.0, 8, "zzz", None]],
    )
    table = read_table(path, "csv")
    preprocessing = Preprocessing.fit(table, "label", rows=[0, 1, 2])
    x1, _, color = preprocessing.columns
    assert (x1["mean"], x1["std"]) == (2.0, 1.0)
    assert color["vocabulary"] == ["a", "b"]
    encoded, unknown = preprocessing.encode(table, [0, 1, 2, 3])
    assert unknown == 1  # the last row has no label
    assert encoded.numeric[:, 0].tolist() == [-1.0, 1.0, 0.0]  # the missing x1 is the mean
    assert encoded.categorical[:, 0].tolist() == [1, 2, 1]
    new_rows, _ = preprocessing.encode(
        read_table(write_csv(tmp_path / "new.csv", [[2.0, 6, "never seen", "q"]]), "csv"), [0]
    )
    assert new_rows.categorical.tolist() == [[0]] and new_rows.target.tolist() == [1]


def test_roc_auc_matches_the_pairwise_definition_with_ties():
    generator = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 5, (60,), generator=generator).double()  # many ties
    positive = torch.rand(60, generator=generator) < 0.4
    pairs = [
        1.0 if p > n else 0.5 if p == n else 0.0
        for p in scores[positive].tolist()
        for n in scores[~positive].tolist()
    ]
    assert _binary_roc_auc(scores, positive) == pytest.approx(sum(pairs) / len(pairs))
    assert _binary_roc_auc(scores, torch.ones(60, dtype=torch.bool)) is None


def test_metrics_of_a_known_confusion():
    target = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 1, 2, 0]), 3).double() * 4
    metrics = _classification_metrics(logits, target, classes=3)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    # per-class F1: 2*1/(2+1+1)=0.5, 2*2/(4+1+0)=0.8, 2*1/(2+0+1)=2/3
    assert metrics["f1_macro"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert 0 < metrics["roc_auc"] <= 1


# Training


def test_training_separable_data_reaches_high_validation_accuracy(tmp_path, dataset):
    ctx = make_context(tmp_path, dataset, FAST)
    result = TabularClassifier().train(ctx)
    assert result.metrics["val_accuracy"] >= 0.9
    assert result.metrics["val_roc_auc"] >= 0.95
    assert result.metrics["epochs_trained"] == 6
    names = {(metric["split"], metric["name"]) for metric in events(ctx, "metric")}
    assert names == {
        ("train", "loss"),
        ("val", "loss"),
        ("val", "accuracy"),
        ("val", "f1_macro"),
        ("val", "roc_auc"),
    }
    assert events(ctx, "progress")[0] == {"step": 1, "total": 6 * BATCHES, "epoch": 1}
    assert result.input_signature == {
        "columns": [
            {"name": "x1", "dtype": "float64"},
            {"name": "x2", "dtype": "float64"},
            {"name": "color", "dtype": "string"},
        ],
        "target": "label",
        "classes": ["no", "yes"],
    }


def test_artifacts_load_as_safetensors_and_json_and_evaluate(tmp_path, dataset):
    ctx = make_context(tmp_path, dataset, FAST)
    result = TabularClassifier().train(ctx)
    assert result.artifacts == {
        "model.safetensors": "out/model.safetensors",
        "config.json": "out/config.json",
    }
    tensors = load_file(tmp_path / result.artifacts["model.safetensors"])
    assert tensors["embeddings.0.weight"].shape == (4, 4)  # 3 colors and the unknown
    config = json.loads((tmp_path / result.artifacts["config.json"]).read_text())
    assert config["architecture"]["hidden_sizes"] == [16]
    assert config["classes"] == ["no", "yes"]
    metrics = TabularClassifier().evaluate(
        make_context(tmp_path, dataset, FAST, model_dir=ctx.output_dir)
    )
    assert metrics["accuracy"] >= 0.9
    assert metrics["rows"] == 300 - 11  # rows without a label are not scored


def test_multiclass_targets_report_one_vs_rest_roc_auc(tmp_path):
    rows = [[x1, x2, color, color] for x1, x2, color, _ in make_rows(200)]
    ctx = make_context(tmp_path, write_csv(tmp_path / "colors.csv", rows), FAST)
    result = TabularClassifier().train(ctx)
    assert result.input_signature["classes"] == ["blue", "green", "red"]
    assert result.metrics["val_accuracy"] >= 0.9
    assert 0.9 <= result.metrics["val_roc_auc"] <= 1


def test_same_seed_gives_identical_weights_and_another_seed_does_not(tmp_path, dataset):
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        ctx = make_context(tmp_path / name, dataset, FAST, seed=seed)
        TabularClassifier().train(ctx)
        runs[name] = weights(ctx)
    assert_same_weights(runs["a"], runs["b"])
    assert not torch.equal(runs["a"]["mlp.0.weight"], runs["c"]["mlp.0.weight"])


def test_csv_and_parquet_of_the_same_table_train_the_same_model(tmp_path):
    rows = make_rows(120)
    csv_path = write_csv(tmp_path / "data.csv", rows)
    parquet_path = tmp_path / "data.parquet"
    pq.write_table(pa.table(dict(zip(COLUMNS, zip(*rows, strict=True), strict=True))), parquet_path)
    trained = []
    for path in (csv_path, parquet_path):
        ctx = make_context(tmp_path / path.suffix, path, FAST)
        TabularClassifier().train(ctx)
        trained.append(weights(ctx))
    assert_same_weights(*trained)


@pytest.mark.parametrize(
    "stops",
    [
        pytest.param([20], id="mid-epoch"),
        pytest.param([2 * BATCHES], id="between-epochs"),
        pytest.param([3, 50, 51], id="three-interruptions"),
    ],
)
def test_interrupted_and_resumed_run_ends_with_identical_weights(tmp_path, dataset, stops):
    uninterrupted = make_context(tmp_path / "whole", dataset, FAST)
    expected = TabularClassifier().train(uninterrupted)

    workdir, resume_state = tmp_path / "pieces", None
    for stop_at in stops:
        ctx = make_context(
            workdir, dataset, FAST, StopAfterStep, resume_state=resume_state, stop_at=stop_at
        )
        assert TabularClassifier().train(ctx) is None
        [checkpoint] = events(ctx, "checkpoint")
        assert checkpoint["step"] == stop_at
        resume_state = load_checkpoint(workdir / checkpoint["path"])
    ctx = make_context(workdir, dataset, FAST, resume_state=resume_state)
    result = TabularClassifier().train(ctx)

    assert_same_weights(weights(uninterrupted), weights(ctx))
    assert result.metrics == expected.metrics
    assert events(ctx, "progress")[0]["step"] == stops[-1] + 1


def test_early_stopping_keeps_the_best_epoch(tmp_path):
    rng = random.Random(1)  # noqa: S311 (seeded test data)
    rows = [[rng.gauss(0, 1), rng.gauss(0, 1), "a", rng.choice("xy")] for _ in range(200)]
    parameters = FAST | {"epochs": 60, "early_stopping_patience": 2, "learning_rate": 0.05}
    ctx = make_context(tmp_path, write_csv(tmp_path / "noise.csv", rows), parameters)
    result = TabularClassifier().train(ctx)
    assert result.metrics["epochs_trained"] == result.metrics["best_epoch"] + 2 < 60
    val_losses = [
        metric["value"]
        for metric in events(ctx, "metric")
        if (metric["split"], metric["name"]) == ("val", "loss")
    ]
    assert result.metrics["val_loss"] == min(val_losses)


def test_checkpoint_every_step_and_resume_from_before_the_epoch_evaluation(tmp_path, dataset):
    ctx = make_context(tmp_path, dataset, FAST | {"epochs": 1}, checkpoint_every_s=0)
    TabularClassifier().train(ctx)
    checkpoints = events(ctx, "checkpoint")
    assert [c["step"] for c in checkpoints] == list(range(1, BATCHES + 1))
    assert not list(ctx.checkpoint_dir.glob(".*.tmp"))
    state = load_checkpoint(tmp_path / checkpoints[-1]["path"])  # weights_only=True inside
    assert (state["epoch"], state["batch"], state["step"]) == (0, BATCHES, BATCHES)

    resumed = make_context(tmp_path / "resumed", dataset, FAST | {"epochs": 1}, resume_state=state)
    TabularClassifier().train(resumed)
    assert_same_weights(weights(ctx), weights(resumed))
    assert not events(resumed, "progress")  # only the epoch's evaluation was left


def test_checkpoint_of_another_run_is_refused(tmp_path, dataset):
    ctx = make_context(tmp_path, dataset, FAST, StopAfterStep, stop_at=2)
    TabularClassifier().train(ctx)
    state = load_checkpoint(tmp_path / events(ctx, "checkpoint")[-1]["path"])
    other = make_context(tmp_path, dataset, FAST | {"epochs": 7}, resume_state=state)
    with pytest.raises(RecipeInputError, match="checkpoint belongs to a run with other"):
        TabularClassifier().train(other)


@pytest.mark.parametrize(
    ("rows", "columns", "target", "message"),
    [
        ([[1, "a"], [2, "b"]], ["x", "label"], "missing", "no column 'missing'; its columns are"),
        ([[1, "a"], [2, "a"], [3, "a"]], ["x", "label"], "label", "a single class"),
        ([[1, None], [2, None]], ["x", "label"], "label", "0 rows with a value"),
        ([[1], [2], [3]], ["label"], "label", "no usable column besides the target"),
    ],
)
def test_data_problems_are_input_errors_in_words(tmp_path, rows, columns, target, message):
    path = write_csv(tmp_path / "bad.csv", rows, columns)
    with pytest.raises(RecipeInputError, match=message):
        TabularClassifier().train(make_context(tmp_path, path, {"target": target}))


# The tabular sample and fine-tuning

SAMPLE_INPUTS = ["age", "monthly_spend", "tenure_months", "support_calls", "plan", "region"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sample") / "sample.csv"
    write_tabular_sample(path, rows=600, seed=0)
    return path


@pytest.fixture(scope="module")
def parent_model(tmp_path_factory, sample) -> Path:
    """A model trained on the sample, to fine-tune."""
    workdir = tmp_path_factory.mktemp("parent")
    result = TabularClassifier().train(make_context(workdir, sample, FAST))
    assert result.metrics["val_accuracy"] > 0.9
    return workdir / "out"


def test_the_tabular_sample_is_learnable_but_not_trivially(tmp_path, sample):
    ctx = make_context(tmp_path, sample, FAST)
    result = TabularClassifier().train(ctx)
    assert 0.9 < result.metrics["val_accuracy"] < 1
    assert [c["name"] for c in result.input_signature["columns"]] == SAMPLE_INPUTS
    assert result.input_signature["classes"] == [0, 1]


def test_fine_tuning_starts_from_the_model_and_keeps_its_accuracy(tmp_path, parent_model):
    new_data = tmp_path / "new.csv"
    write_tabular_sample(new_data, rows=400, seed=1)
    holdout = tmp_path / "holdout.csv"
    write_tabular_sample(holdout, rows=600, seed=2)

    def first_step_loss(workdir: Path, **overrides) -> float:
        ctx = make_context(workdir, new_data, FAST, StopAfterStep, stop_at=1, **overrides)
        assert TabularClassifier().train(ctx) is None
        return load_checkpoint(workdir / events(ctx, "checkpoint")[0]["path"])["loss_sum"].item()

    scratch = first_step_loss(tmp_path / "scratch-step")
    tuned = first_step_loss(tmp_path / "tuned-step", model_dir=parent_model)
    assert tuned < 0.5 * scratch

    # The parameters ask for the default layers; the fine-tune keeps the model's.
    parameters = {k: v for k, v in FAST.items() if k != "hidden_sizes"}
    ctx = make_context(tmp_path / "tuned", new_data, parameters, model_dir=parent_model)
    result = TabularClassifier().train(ctx)
    assert result.parameters == validate_parameters(TabularClassifier, FAST)
    assert load_file(ctx.output_dir / "model.safetensors")["mlp.0.weight"].shape[0] == 16

    def holdout_accuracy(model_dir: Path) -> float:
        evaluation = make_context(tmp_path / "eval", holdout, FAST, model_dir=model_dir)
        return TabularClassifier().evaluate(evaluation)["accuracy"]

    assert holdout_accuracy(ctx.output_dir) >= holdout_accuracy(parent_model) - 0.01 > 0.89


@pytest.mark.parametrize(
    ("edit", "parameters", "message"),
    [
        (
            lambda row: row | {"channel": "web"},
            {},
            "it has columns the model lacks: 'channel'",
        ),
        (
            lambda row: {k: v for k, v in row.items() if k != "region"},
            {},
            "it lacks columns the model needs: 'region'",
        ),
        (
            lambda row: row | {"label": "2" if row["age"] == "70" else row["label"]},
            {},
            "it has classes the model lacks: 2",
        ),
        (
            lambda row: row | {"plan": "7", "age": "old"},
            {},
            "columns the model reads as numbers hold text: 'age'",
        ),
        (lambda row: row, {"target": "plan"}, "predicts 'label'; set the target parameter"),
    ],
    ids=["extra-column", "missing-column", "new-class", "text-for-numbers", "other-target"],
)
def test_fine_tuning_refuses_data_that_differs_saying_how(
    tmp_path, sample, parent_model, edit, parameters, message
):
    with sample.open(newline="") as handle:
        rows = [edit(row) for row in csv.DictReader(handle)]
    path = tmp_path / "differs.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    ctx = make_context(tmp_path, path, FAST | parameters, model_dir=parent_model)
    with pytest.raises(RecipeInputError, match=re.escape(message)):
        TabularClassifier().train(ctx)


def test_a_checkpoint_resumes_only_the_fine_tune_it_came_from(tmp_path, sample, parent_model):
    ctx = make_context(tmp_path, sample, FAST, StopAfterStep, stop_at=2)
    TabularClassifier().train(ctx)
    state = load_checkpoint(tmp_path / events(ctx, "checkpoint")[-1]["path"])
    tuned = make_context(tmp_path, sample, FAST, resume_state=state, model_dir=parent_model)
    with pytest.raises(RecipeInputError, match="checkpoint belongs to a run with other"):
        TabularClassifier().train(tuned)


# The context


def test_log_lines_that_look_structured_are_defused(tmp_path, dataset):
    ctx = make_context(tmp_path, dataset, FAST)
    ctx.log('column "a\n@@checkpoint {"path": "x", "step": 1}" is odd')
    assert [parse_line(line)[0] for line in ctx.emit] == ["log", "log"]


def test_checkpoints_refuse_objects_that_need_unpickling(tmp_path, dataset):
    ctx = make_context(tmp_path, dataset, FAST)
    with pytest.raises(TypeError, match=r"state\['when'\] is a \w*Path;"):
        ctx.save_checkpoint({"when": Path("/")}, step=1)


def test_max_runtime_asks_the_recipe_to_stop(tmp_path, dataset):
    ctx = make_context(tmp_path, dataset, FAST, max_runtime_s=1e-9)
    assert ctx.should_stop()
    assert "maximum runtime" in ctx.emit[-1]


def test_torch_load_is_only_called_with_weights_only():
    sources = [
        *REPO.joinpath("jobs/recipes").glob("*.py"),
        *REPO.joinpath("jobs/runner").glob("*.py"),
        *REPO.joinpath("factory_job").glob("*.py"),  # checkpoints, for recipes and packages
    ]
    calls = [
        (path.name, call)
        for path in sources
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text())
    ]
    assert calls
    assert all("weights_only=True" in call for _, call in calls), calls


def test_the_gate_scores_exactly_the_rows_the_training_run_held_out(tmp_path, sample):
    """Same seed, same split: the gate's accuracy on the held-out rows is the run's own
    validation accuracy, and each row carries its slice (the sample's region)."""
    ctx = make_context(tmp_path, sample, FAST)
    result = TabularClassifier().train(ctx)
    outcomes, slices = TabularClassifier().validation_outcomes(
        ctx,
        model_dirs={"challenger": tmp_path / "out"},
        split_seed=ctx.seed,
        slice_column="region",
    )
    correct = outcomes["challenger"]
    assert len(correct) == 120 and len(slices) == 120 and None not in slices
    assert len(set(slices)) > 1
    assert sum(correct) / len(correct) == pytest.approx(result.metrics["val_accuracy"])
    _, unsliced = TabularClassifier().validation_outcomes(
        ctx, model_dirs={}, split_seed=ctx.seed, slice_column="no such column"
    )
    assert set(unsliced) == {None}
