"""Batch inference with the tabular classifier, through the job's child and in-process (chunked
reading, the predictions file, bad data, stopping), and online prediction with the NumPy
`predict_rows`, which must agree with it and must not need torch."""

import csv
import io
import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone
from safetensors.numpy import load_file

from billing.models import UsageRecord
from jobs.recipes.base import RecipeContext, RecipeInputError, validate_parameters
from jobs.recipes.tabular import TabularClassifier, predict_rows
from jobs.runner.protocol import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, parse_line, write_spec
from jobs.samples import write_tabular_sample
from registry.models import ModelVersion

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
def test_data_the_model_cannot_read_exits_2_saying_why(
    tmp_path, model_dir, new_rows, edit, message
):
    rows = edit(read_csv(new_rows))
    write_rows(tmp_path / "data.csv", rows, list(rows[0]))
    run = run_child(tmp_path, task="predict", parameters={}, model_dir=str(model_dir))
    assert run.returncode == EXIT_BAD_INPUT
    assert message in run.stderr
    assert not (tmp_path / "out" / "predictions.csv").exists()


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


# Online prediction with NumPy


def test_predict_rows_agrees_with_batch_inference(tmp_path, model_dir, new_rows):
    rows = read_csv(new_rows)
    batch = read_csv(predict_file(tmp_path, model_dir, new_rows).output_dir / "predictions.csv")
    config = json.loads((model_dir / "config.json").read_text())

    online = predict_rows(config, load_file(model_dir / "model.safetensors"), signature_rows(rows))

    assert [str(row["prediction"]) for row in online] == [row["prediction"] for row in batch]
    assert [row["probability"] for row in online] == pytest.approx(
        [float(row["probability"]) for row in batch], abs=1e-5
    )
    assert {type(row["prediction"]) for row in online} == {int}  # the classes as trained


def test_predict_rows_takes_missing_values_and_unknown_categories(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    row = dict.fromkeys(INPUTS) | {"plan": "enterprise", "extra": [1, 2]}
    [prediction] = predict_rows(config, load_file(model_dir / "model.safetensors"), [row])
    assert prediction["prediction"] in (0, 1) and 0.5 <= prediction["probability"] <= 1
    assert predict_rows(config, load_file(model_dir / "model.safetensors"), []) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"plan": ...}, "rows[1] has no column 'plan'."),
        ({"age": "41"}, """rows[1], column 'age': expected a number, got "41"."""),
        ({"age": True}, "rows[1], column 'age': expected a number, got true."),
        ({"region": 3}, "rows[1], column 'region': expected text, got 3."),
    ],
)
def test_predict_rows_names_the_row_and_column_it_cannot_read(model_dir, change, message):
    config = json.loads((model_dir / "config.json").read_text())
    good = {"age": 41, "monthly_spend": 30.5, "tenure_months": 12, "support_calls": 1}
    good |= {"plan": "basic", "region": "north"}
    bad = {k: v for k, v in (good | change).items() if v is not ...}
    with pytest.raises(RecipeInputError) as caught:
        predict_rows(config, load_file(model_dir / "model.safetensors"), [good, bad])
    assert str(caught.value) == message


def test_predict_rows_needs_no_torch(model_dir):
    probe = textwrap.dedent(
        f"""
        import json, sys
        from safetensors.numpy import load_file
        from jobs.recipes.tabular import predict_rows
        model = {str(model_dir)!r}
        config = json.load(open(model + "/config.json"))
        row = {{"age": 30, "monthly_spend": None, "tenure_months": 3, "support_calls": 4,
               "plan": "basic", "region": "west"}}
        print(json.dumps(predict_rows(config, load_file(model + "/model.safetensors"), [row])))
        print("torch" in sys.modules)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    predictions, torch_imported = run.stdout.splitlines()
    assert json.loads(predictions)[0]["prediction"] in (0, 1)
    assert torch_imported == "False"


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


# Online prediction through the API: retries billed once, model size and memory bounded


def _served(client, org, model_dir, versions=1, name="churn") -> str:
    created = client.post(f"/api/v1/orgs/{org.slug}/models/", {"name": name}, format="json")
    assert created.status_code == 201, created.content
    for _ in range(versions):
        registered = client.post(
            f"/api/v1/orgs/{org.slug}/models/{name}/versions/",
            {
                "weights": SimpleUploadedFile(
                    "model.safetensors", (model_dir / "model.safetensors").read_bytes()
                ),
                "config": (model_dir / "config.json").read_text(),
                "recipe_name": "tabular-classifier",
            },
            format="multipart",
        )
        assert registered.status_code == 201, registered.content
    return f"/api/v1/orgs/{org.slug}/models/{name}/predict/"


def _rows(new_rows, count=3):
    return signature_rows(read_csv(new_rows)[:count])


def _billed(org) -> int:
    return UsageRecord.objects.filter(organization=org, resource="predictions").count()


@pytest.fixture
def predictor(org, member_factory, client_for, local_store):
    from jobs.inference import model_cache

    model_cache.clear()
    yield client_for(member_factory(org, "developer"))
    model_cache.clear()


@pytest.mark.django_db
def test_a_retried_prediction_with_the_same_idempotency_key_is_billed_once(
    org, predictor, model_dir, new_rows
):
    url = _served(predictor, org, model_dir)
    body = {"version": "1", "rows": _rows(new_rows)}
    first = predictor.post(url, body, format="json", HTTP_IDEMPOTENCY_KEY="retry-1")
    again = predictor.post(url, body, format="json", HTTP_IDEMPOTENCY_KEY="retry-1")
    assert first.status_code == again.status_code == 200, again.content
    assert first.json() == again.json()
    assert _billed(org) == 1
    assert predictor.post(url, body, format="json", HTTP_IDEMPOTENCY_KEY="2").status_code == 200
    assert predictor.post(url, body, format="json").status_code == 200  # no key: each its own
    assert _billed(org) == 3


@pytest.mark.django_db
def test_reusing_a_key_for_other_rows_does_not_make_them_free(org, predictor, model_dir, new_rows):
    url = _served(predictor, org, model_dir)
    rows = _rows(new_rows, 6)
    for part in (rows[:3], rows[3:]):
        response = predictor.post(
            url, {"version": "1", "rows": part}, format="json", HTTP_IDEMPOTENCY_KEY="same"
        )
        assert response.status_code == 200, response.content
    assert _billed(org) == 2


@pytest.mark.django_db
def test_a_key_reused_after_the_idempotency_window_is_a_new_billed_prediction(
    org, predictor, model_dir, new_rows, settings
):
    """A monitor sends the same row with the same fixed key every minute: a repeat answers as
    the first request only within IDEMPOTENCY_WINDOW_S of it; after that it is billed again."""
    settings.IDEMPOTENCY_WINDOW_S = 3600
    url = _served(predictor, org, model_dir)
    body = {"version": "1", "rows": _rows(new_rows, 1)}

    def probe():
        response = predictor.post(url, body, format="json", HTTP_IDEMPOTENCY_KEY="monitor")
        assert response.status_code == 200, response.content

    def first_request_was(seconds_ago):
        UsageRecord.objects.filter(organization=org, resource="predictions").update(
            created_at=timezone.now() - timedelta(seconds=seconds_ago)
        )

    probe()
    first_request_was(3600 - 60)
    probe()
    assert _billed(org) == 1  # a retry within the window
    first_request_was(3600 + 60)
    probe()
    assert _billed(org) == 2  # the window has passed: a new prediction
    probe()
    assert _billed(org) == 2  # and its own retries are free again


@pytest.mark.django_db
def test_weights_changed_in_storage_after_registration_are_not_served(
    org, predictor, model_dir, new_rows
):
    """As a compromised store (or a tenant with a stale upload URL) would: replace the stored
    weights behind a registered version with other bytes of the same size."""
    from registry.storage import get_storage

    url = _served(predictor, org, model_dir)
    weights = ModelVersion.objects.get(registered_model__organization=org).artifacts.get(
        name="model.safetensors"
    )
    original = (model_dir / "model.safetensors").read_bytes()
    get_storage().save(weights.storage_key, io.BytesIO(original[:-8] + b"\x00" * 8))
    response = predictor.post(url, {"version": "1", "rows": _rows(new_rows)}, format="json")
    assert response.status_code == 409, response.content
    assert response.json()["code"] == "model_files_changed"
    assert "sha256" in response.json()["detail"]
    assert _billed(org) == 0


@pytest.mark.django_db
def test_an_overlong_prediction_idempotency_key_is_a_400(org, predictor, model_dir, new_rows):
    url = _served(predictor, org, model_dir)
    response = predictor.post(
        url,
        {"version": "1", "rows": _rows(new_rows)},
        format="json",
        HTTP_IDEMPOTENCY_KEY="k" * 201,
    )
    assert response.status_code == 400 and "idempotency_key" in response.json()["fields"]
    assert _billed(org) == 0


@pytest.mark.django_db
def test_a_model_over_the_online_size_limit_is_refused_with_a_clear_error(
    org, predictor, model_dir, new_rows, settings
):
    url = _served(predictor, org, model_dir)
    size = (model_dir / "model.safetensors").stat().st_size
    settings.ONLINE_PREDICTION_MAX_MODEL_BYTES = size - 1
    response = predictor.post(url, {"version": "1", "rows": _rows(new_rows)}, format="json")
    assert response.status_code == 400, response.content
    body = response.json()
    assert body["code"] == "model_too_large" and "kind infer" in body["detail"]
    assert _billed(org) == 0
    settings.ONLINE_PREDICTION_MAX_MODEL_BYTES = size
    response = predictor.post(url, {"version": "1", "rows": _rows(new_rows)}, format="json")
    assert response.status_code == 200, response.content


@pytest.mark.django_db
def test_models_loaded_beyond_the_cache_budget_are_evicted_by_bytes(
    org, predictor, model_dir, new_rows, settings
):
    from jobs.inference import model_cache

    resident = sum(a.nbytes for a in load_file(model_dir / "model.safetensors").values())
    settings.ONLINE_PREDICTION_CACHE_BYTES = int(resident * 2.5)
    url = _served(predictor, org, model_dir, versions=3)
    versions = sorted(ModelVersion.objects.filter(organization=org).values_list("pk", flat=True))
    for number in ("1", "2", "3"):
        response = predictor.post(url, {"version": number, "rows": _rows(new_rows)}, format="json")
        assert response.status_code == 200, response.content
        assert model_cache.resident_bytes <= settings.ONLINE_PREDICTION_CACHE_BYTES
    assert model_cache.keys() == versions[1:]  # the least recently used went first
    response = predictor.post(url, {"version": "1", "rows": _rows(new_rows)}, format="json")
    assert response.status_code == 200, response.content
    assert model_cache.keys() == [versions[2], versions[0]]
    assert model_cache.resident_bytes == 2 * resident


def test_the_model_cache_evicts_least_recently_used_until_the_new_model_fits():
    import numpy as np

    from jobs.inference import ModelCache

    cache = ModelCache()

    def model(size):
        return lambda: ({}, {"w": np.zeros(size, dtype=np.uint8)})

    cache.get("a", model(1000), budget=3000)
    cache.get("b", model(1000), budget=3000)
    cache.get("a", model(1000), budget=3000)  # a is now the most recently used
    cache.get("c", model(1500), budget=3000)
    assert cache.keys() == ["a", "c"] and cache.resident_bytes == 2500
    cache.get("d", model(2900), budget=3000)
    assert cache.keys() == ["d"] and cache.resident_bytes == 2900
    # A model larger than the whole budget is served but never kept.
    _config, weights = cache.get("e", model(3001), budget=3000)
    assert weights["w"].nbytes == 3001
    assert cache.keys() == ["d"] and cache.resident_bytes == 2900
