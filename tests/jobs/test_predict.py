"""Batch inference with the tabular classifier, through the job's child and in-process (chunked
reading, the predictions file, bad data, stopping), and the online predictor a deployment's
replica answers with, which must agree with it."""

import csv
import json
import os
import subprocess
import sys
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.recipes.base import RecipeContext, RecipeInputError, validate_parameters
from jobs.recipes.tabular import TabularClassifier
from jobs.runner.protocol import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, parse_line, write_spec
from jobs.samples import write_tabular_sample

REPO = Path(__file__).resolve().parents[2]
CHILD_ENV = os.environ | {"OMP_NUM_THREADS": "1"}
CHILD_TIMEOUT_S = 60
PARAMETERS = {
    "target": "label",
    "epochs": 6,
    "batch_size": 16,
    "hidden_sizes": [16],
    "learning_rate": 0.01,
}
INPUTS = ["age", "monthly_spend", "tenure_months", "support_calls", "plan", "region"]


@dataclass
class ChildRun:
    returncode: int
    lines: list[tuple[str, object]]
    stderr: str

    def of(self, kind: str) -> list[dict]:
        return [payload for k, payload in self.lines if k == kind]


def run_child(workdir: Path, **spec) -> ChildRun:
    write_spec(
        workdir,
        {
            "recipe": "tabular-classifier",
            "parameters": PARAMETERS,
            "dataset": {"path": "data.csv", "format": "csv"},
            "output_dir": "out",
            "checkpoint_dir": "checkpoints",
            "checkpoint_every_s": 3600,
            "seed": 3,
        }
        | spec,
    )
    process = subprocess.run(
        [sys.executable, "-m", "jobs.runner.child", str(workdir)],
        cwd=REPO,
        env=CHILD_ENV,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    lines = [parse_line(line) for line in process.stdout.splitlines()]
    return ChildRun(process.returncode, lines, process.stderr)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_rows(path: Path, rows: list[dict], columns: list[str]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def predict_context(
    workdir: Path, model_dir: Path, dataset: Path, cls: type = RecipeContext, **overrides
) -> RecipeContext:
    settings = {
        "workdir": workdir,
        "dataset_path": dataset,
        "dataset_format": dataset.suffix.lstrip("."),
        "parameters": validate_parameters(TabularClassifier, {}, task="predict"),
        "seed": 0,
        "output_dir": workdir / "out",
        "checkpoint_dir": workdir / "checkpoints",
        "model_dir": model_dir,
        "devices": ["cpu"],
        "emit": Lines(),
    }
    return cls(**(settings | overrides))


def predict_file(workdir: Path, model_dir: Path, dataset: Path, **overrides) -> RecipeContext:
    ctx = predict_context(workdir, model_dir, dataset, **overrides)
    assert TabularClassifier().predict(ctx) is not None
    return ctx


class Lines(list):
    """Stands in for the child's stdout: keeps every line the recipe emits."""

    def __call__(self, line: str) -> None:
        self.append(line)

    def of(self, kind: str) -> list[dict]:
        return [payload for k, payload in map(parse_line, self) if k == kind]


def signature_rows(rows: list[dict[str, str]]) -> list[dict]:
    """CSV rows as an API client would send them: typed per the input signature, None where
    missing, without the label."""

    def number(text: str) -> float | int | None:
        return None if text == "" else float(text) if "." in text else int(text)

    return [
        {
            "age": number(row["age"]),
            "monthly_spend": number(row["monthly_spend"]),
            "tenure_months": number(row["tenure_months"]),
            "support_calls": number(row["support_calls"]),
            "plan": row["plan"],
            "region": row["region"],
        }
        for row in rows
    ]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These models are tiny: more threads only contend for a shared machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A model the child trained on the tabular sample, as a model version's directory."""
    workdir = tmp_path_factory.mktemp("train")
    write_tabular_sample(workdir / "data.csv", rows=600, seed=0)
    run = run_child(workdir)
    assert run.returncode == EXIT_OK, run.stderr
    [result] = run.of("result")
    assert result["metrics"]["val_accuracy"] > 0.9
    return workdir / "out"


@pytest.fixture(scope="module")
def new_rows(tmp_path_factory) -> Path:
    """Rows the model has not seen, with their labels."""
    path = tmp_path_factory.mktemp("new") / "new.csv"
    write_tabular_sample(path, rows=250, seed=7)
    return path


# Batch inference through the child


@pytest.mark.slow
def test_child_predicts_every_row_chunk_by_chunk(tmp_path, model_dir, new_rows):
    (tmp_path / "data.csv").write_bytes(new_rows.read_bytes())
    run = run_child(
        tmp_path, task="predict", parameters={}, model_dir=str(model_dir), chunk_rows=64
    )

    assert run.returncode == EXIT_OK, run.stderr
    [result] = run.of("result")
    assert result == {
        "metrics": {"rows": 250},
        "artifacts": {"predictions.csv": "out/predictions.csv"},
        "input_signature": {},
        "parameters": {},
    }
    # Rows are counted as they are predicted, a chunk at a time; a CSV's length is unknown.
    assert run.of("progress")[0] == {"step": 64, "total": None, "epoch": 1}
    assert all(progress["step"] % 64 == 0 for progress in run.of("progress")[:-1])
    assert not run.of("metric") and not run.of("checkpoint")

    inputs = read_csv(new_rows)
    predictions = read_csv(tmp_path / "out" / "predictions.csv")
    assert list(predictions[0]) == [*INPUTS, "prediction", "probability"]  # the target is dropped
    assert len(predictions) == len(inputs)
    # The input's cells come back as they were written, in order.
    assert [{name: row[name] for name in INPUTS} for row in predictions] == [
        {name: row[name] for name in INPUTS} for row in inputs
    ]
    assert all(0.5 <= float(row["probability"]) <= 1 for row in predictions)
    correct = sum(p["prediction"] == i["label"] for p, i in zip(predictions, inputs, strict=True))
    assert correct / len(inputs) > 0.9


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda rows: [{k: v for k, v in row.items() if k != "plan"} for row in rows],
            "The dataset lacks columns the model needs: 'plan'; its columns are: 'age',",
        ),
        (
            lambda rows: [row | {"age": "old"} if i == 2 else row for i, row in enumerate(rows)],
            "Row 3 of the dataset, column 'age': 'old' is not a number.",
        ),
    ],
    ids=["missing-column", "text-in-a-number-column"],
)
@pytest.mark.slow
def test_data_the_model_cannot_read_exits_2_saying_why(
    tmp_path, model_dir, new_rows, edit, message
):
    rows = edit(read_csv(new_rows))
    write_rows(tmp_path / "data.csv", rows, list(rows[0]))
    run = run_child(tmp_path, task="predict", parameters={}, model_dir=str(model_dir))
    assert run.returncode == EXIT_BAD_INPUT
    assert message in run.stderr
    assert not (tmp_path / "out" / "predictions.csv").exists()


@pytest.mark.slow
def test_predict_parameters_follow_the_predict_schema(tmp_path, model_dir, new_rows):
    (tmp_path / "data.csv").write_bytes(new_rows.read_bytes())
    run = run_child(tmp_path, task="predict", parameters={"epochs": 3}, model_dir=str(model_dir))
    assert run.returncode == EXIT_BAD_INPUT
    assert "parameters.epochs: Unknown parameter" in run.stderr


# Batch inference in-process


def test_parquet_is_read_in_chunks_and_its_row_count_is_the_total(tmp_path, model_dir, new_rows):
    rows = read_csv(new_rows)
    typed = signature_rows(rows)
    path = tmp_path / "new.parquet"
    pq.write_table(pa.Table.from_pylist(typed), path, row_group_size=100)
    ctx = predict_context(tmp_path, model_dir, path, chunk_rows=40)

    result = TabularClassifier().predict(ctx)

    assert result.metrics == {"rows": 250}
    progress = ctx.emit.of("progress")
    assert progress[0] == {"step": 40, "total": 250, "epoch": 1}
    assert progress[-1] == {"step": 250, "total": 250, "epoch": 1}
    from_parquet = read_csv(ctx.output_dir / "predictions.csv")
    from_csv = read_csv(
        predict_file(tmp_path / "csv", model_dir, new_rows).output_dir / "predictions.csv"
    )
    assert [row["prediction"] for row in from_parquet] == [row["prediction"] for row in from_csv]
    assert [float(row["probability"]) for row in from_parquet] == pytest.approx(
        [float(row["probability"]) for row in from_csv], abs=1e-6
    )


def test_memory_stays_flat_whatever_the_dataset_size(tmp_path, model_dir):
    """Chunks bound what prediction holds: eight times the rows take about the same peak
    memory, while the large file read as one chunk takes several times more."""
    small, large = tmp_path / "small.csv", tmp_path / "large.csv"
    write_tabular_sample(small, rows=1000, seed=1)
    write_tabular_sample(large, rows=8000, seed=1)
    predict_file(tmp_path / "warm-up", model_dir, small, chunk_rows=100)

    def peak(dataset: Path, chunk_rows: int) -> int:
        workdir = tmp_path / f"{dataset.stem}-{chunk_rows}"
        tracemalloc.start()
        try:
            predict_file(workdir, model_dir, dataset, chunk_rows=chunk_rows)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    chunked_small, chunked_large = peak(small, 100), peak(large, 100)
    assert chunked_large < 1.25 * chunked_small
    assert peak(large, 8000) > 4 * chunked_large


def test_an_empty_dataset_gives_a_header_and_no_rows(tmp_path, model_dir):
    dataset = write_rows(tmp_path / "empty.csv", [], [*INPUTS, "customer_id"])
    ctx = predict_file(tmp_path, model_dir, dataset)
    assert (ctx.output_dir / "predictions.csv").read_text().splitlines() == [
        ",".join([*INPUTS, "customer_id", "prediction", "probability"])
    ]


@dataclass
class StopAfterFirstChunk(RecipeContext):
    """Stands in for SIGTERM arriving once the first chunk is predicted."""

    def progress(self, step: int, total: int | None, epoch: int) -> None:
        super().progress(step, total, epoch)
        self.stop_event.set()


def test_a_stopped_prediction_leaves_no_file(tmp_path, model_dir, new_rows):
    ctx = predict_context(tmp_path, model_dir, new_rows, StopAfterFirstChunk, chunk_rows=50)
    assert TabularClassifier().predict(ctx) is None
    assert ctx.emit.of("progress") == [{"step": 50, "total": None, "epoch": 1}]
    assert list(ctx.output_dir.iterdir()) == []


def test_a_model_of_another_recipe_is_refused(tmp_path, model_dir, new_rows):
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    config = json.loads((model_dir / "config.json").read_text()) | {"recipe": "text-classifier"}
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(RecipeInputError, match="made by the recipe 'text-classifier'"):
        TabularClassifier().predict(predict_context(tmp_path, other, new_rows))


# Online prediction: the predictor a replica loads once and answers requests with


def _online(model_dir):
    return TabularClassifier.online_predictor(model_dir)


def test_the_online_predictor_agrees_with_batch_inference(tmp_path, model_dir, new_rows):
    rows = read_csv(new_rows)
    batch = read_csv(predict_file(tmp_path, model_dir, new_rows).output_dir / "predictions.csv")

    online = _online(model_dir)(signature_rows(rows))

    assert [row["label"] for row in online] == [row["prediction"] for row in batch]
    assert [row["probabilities"][row["label"]] for row in online] == pytest.approx(
        [float(row["probability"]) for row in batch], abs=1e-5
    )


def test_the_online_predictor_takes_missing_values_and_unknown_categories(model_dir):
    row = dict.fromkeys(INPUTS) | {"plan": "enterprise", "extra": [1, 2]}
    predict = _online(model_dir)
    [prediction] = predict([row])
    assert prediction["label"] in ("0", "1")
    assert max(prediction["probabilities"].values()) >= 0.5
    assert predict([]) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"plan": ...}, "inputs[1] has no column 'plan'."),
        ({"age": "41"}, """inputs[1], column 'age': expected a number, got "41"."""),
        ({"age": True}, "inputs[1], column 'age': expected a number, got true."),
        ({"region": 3}, "inputs[1], column 'region': expected text, got 3."),
    ],
)
def test_the_online_predictor_names_the_input_and_column_it_cannot_read(model_dir, change, message):
    good = {"age": 41, "monthly_spend": 30.5, "tenure_months": 12, "support_calls": 1}
    good |= {"plan": "basic", "region": "north"}
    bad = {k: v for k, v in (good | change).items() if v is not ...}
    with pytest.raises(RecipeInputError) as caught:
        _online(model_dir)([good, bad])
    assert str(caught.value) == message


@pytest.mark.slow
def test_the_spec_still_fails_predict_without_a_model(tmp_path):
    """A spec written by hand, bypassing write_spec, is the platform's error, not the tenant's."""
    (tmp_path / "spec.json").write_text(
        json.dumps(
            {
                "task": "predict",
                "recipe": "tabular-classifier",
                "parameters": {},
                "dataset": {"path": "data.csv", "format": "csv"},
                "output_dir": "out",
                "checkpoint_dir": "checkpoints",
                "seed": 1,
            }
        )
    )
    process = subprocess.run(
        [sys.executable, "-m", "jobs.runner.child", str(tmp_path)],
        cwd=REPO,
        env=CHILD_ENV,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    assert process.returncode == EXIT_FAILED
    assert "a predict task needs model_dir" in process.stderr
