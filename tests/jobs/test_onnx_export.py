"""Edge export: a model of each recipe, trained small here, becomes a bundle whose run.py, run in
a fresh interpreter that imports nothing of the platform (nor torch), answers inputs as the
platform's online predictor does, within the stated tolerance; a bundle that does not is refused
with the largest difference shown."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import math
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from jobs.recipes.images import ImageClassifier
from jobs.recipes.onnx_export import (
    FORECAST_ATOL,
    FORECAST_RTOL,
    PROBABILITY_ATOL,
    ExportMismatch,
    bundle_check,
    export_bundle,
)
from jobs.recipes.tabular import TabularClassifier
from jobs.recipes.text import TextClassifier
from jobs.recipes.timeseries import TimeSeriesForecaster
from jobs.samples.images import write_image_sample
from jobs.samples.tabular import write_tabular_sample
from jobs.samples.text import write_text_sample
from jobs.samples.timeseries import write_timeseries_sample
from tests.jobs.recipe_helpers import one_torch_thread, read_csv, recipe_context

RUN_TIMEOUT_S = 60
PLATFORM_MODULES = ("torch", "django", "jobs", "registry", "tenants", "factory_saas")


@pytest.fixture(autouse=True, scope="module")
def _like_the_child():
    with one_torch_thread():
        yield


def _trained(recipe, tmp_path, dataset, parameters, **context):
    ctx = recipe_context(recipe, tmp_path, dataset, parameters, seed=3, **context)
    assert recipe().train(ctx) is not None
    return ctx.output_dir


def _tabular(tmp_path):
    dataset = tmp_path / "churn.csv"
    write_tabular_sample(dataset, rows=300, seed=1)
    parameters = {"target": "label", "epochs": 2, "hidden_sizes": [8], "batch_size": 64}
    inputs = [
        {
            "age": int(row["age"]),
            "monthly_spend": float(row["monthly_spend"]) if row["monthly_spend"] else None,
            "tenure_months": int(row["tenure_months"]),
            "support_calls": int(row["support_calls"]),
            "plan": row["plan"],
            "region": row["region"] if position % 5 else "a region it never saw",
        }
        for position, row in enumerate(read_csv(dataset)[:12])
    ]
    return _trained(TabularClassifier, tmp_path, dataset, parameters), inputs


def _text(model):
    def make(tmp_path):
        dataset = tmp_path / "reviews.csv"
        write_text_sample(dataset, rows=300, seed=3)
        parameters = {
            "text_column": "text",
            "target": "label",
            "epochs": 2,
            "embedding_dim": 8,
            "model": model,
            "max_length": 16,
        }
        texts = [row["text"] for row in read_csv(dataset)[:10]]
        inputs = [{"text": text} for text in [*texts, "", "Zebras?! " * 20]]
        return _trained(TextClassifier, tmp_path, dataset, parameters), inputs

    return make


def _images(tmp_path):
    dataset = tmp_path / "shapes.zip"
    write_image_sample(dataset, per_class=12, size=16, seed=2)
    parameters = {"image_size": 16, "epochs": 1, "batch_size": 16, "width": 4}
    with zipfile.ZipFile(dataset) as archive:
        files = [archive.read(name) for name in sorted(archive.namelist())[:6]]
    inputs = [{"image": base64.b64encode(data).decode()} for data in files]
    model_dir = _trained(
        ImageClassifier, tmp_path, dataset, parameters, dataset_format="image_folder_zip"
    )
    return model_dir, inputs


def _timeseries(model):
    def make(tmp_path):
        dataset = tmp_path / "hourly.csv"
        write_timeseries_sample(dataset, points=24 * 20, seed=1)
        parameters = {"window": 24, "horizon": 6, "epochs": 2, "hidden_size": 8, "model": model}
        history = [float(row["value"]) for row in read_csv(dataset)]
        inputs = [
            {"history": history[-30:]},
            {"history": history[-50:-20]},
            {"history": history[-24:], "series": "unseen"},
        ]
        return _trained(TimeSeriesForecaster, tmp_path, dataset, parameters), inputs

    return make


def _close(edge: list[dict], platform: list[dict]) -> None:
    assert len(edge) == len(platform)
    for ours, theirs in zip(edge, platform, strict=True):
        if "forecast" in theirs:
            assert ours["forecast"] == pytest.approx(
                theirs["forecast"], abs=FORECAST_ATOL, rel=FORECAST_RTOL
            )
        else:
            assert ours["label"] == theirs["label"]
            assert ours["probabilities"] == pytest.approx(
                theirs["probabilities"], abs=PROBABILITY_ATOL
            )


@pytest.mark.parametrize(
    "make",
    [
        _tabular,
        _text("embedding_bag"),
        _text("transformer"),
        _images,
        _timeseries("mlp"),
        _timeseries("gru"),
    ],
    ids=["tabular", "text-bag", "text-transformer", "images", "timeseries-mlp", "timeseries-gru"],
)
@pytest.mark.slow
def test_the_bundle_runs_alone_and_answers_as_the_platform_does(tmp_path, make):
    model_dir, inputs = make(tmp_path)
    bundle = tmp_path / "edge.zip"
    check = export_bundle(model_dir, bundle, source="churn v3", log=lambda line: None)
    assert check["max_difference"] <= max(PROBABILITY_ATOL, FORECAST_ATOL)
    assert check["samples"] > 0
    folder = tmp_path / "unpacked"
    with zipfile.ZipFile(bundle) as archive:
        assert sorted(archive.namelist()) == [
            "README.md",
            "model.onnx",
            "preprocessing.json",
            "run.py",
        ]
        archive.extractall(folder)
    assert "churn v3" in (folder / "README.md").read_text()
    (folder / "inputs.json").write_text(json.dumps(inputs))
    # -I: no PYTHONPATH, no current folder on the path, so the platform cannot be imported;
    # importtime lists every module the run imported.
    run = subprocess.run(
        [sys.executable, "-I", "-X", "importtime", "run.py", "inputs.json"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines()}
    assert not [name for name in imported if name.split(".")[0] in PLATFORM_MODULES]
    assert "onnxruntime" in imported
    recipe = json.loads((model_dir / "config.json").read_text())["recipe"]
    predictor = {
        "tabular-classifier": TabularClassifier,
        "text-classifier": TextClassifier,
        "image-classifier": ImageClassifier,
        "timeseries-forecaster": TimeSeriesForecaster,
    }[recipe].online_predictor(model_dir)
    _close(json.loads(run.stdout), predictor(inputs))


def test_a_bundle_that_disagrees_with_the_model_is_refused_with_the_difference(tmp_path):
    model_dir, inputs = _tabular(tmp_path)
    bundle = tmp_path / "edge.zip"
    export_bundle(model_dir, bundle, log=lambda line: None)
    folder = tmp_path / "unpacked"
    with zipfile.ZipFile(bundle) as archive:
        archive.extractall(folder)
    reference = TabularClassifier.online_predictor(model_dir)
    assert bundle_check(folder, reference, inputs)["max_difference"] < PROBABILITY_ATOL
    # A preprocessing that standardizes one column by another mean: the graph is right, the
    # bundle is not, and the check runs through the bundle's own run.py.
    path = folder / "preprocessing.json"
    preprocessing = json.loads(path.read_text())
    age = next(spec for spec in preprocessing["columns"] if spec["name"] == "age")
    age["mean"] += 3 * age["std"]
    path.write_text(json.dumps(preprocessing))
    with pytest.raises(ExportMismatch) as refused:
        bundle_check(folder, reference, inputs)
    message = str(refused.value)
    assert "atol 0.0001 on probabilities" in message
    assert "the largest difference is" in message
    assert "probability of" in message


def test_a_model_whose_outputs_are_not_numbers_is_not_exported(tmp_path):
    model_dir, _inputs = _tabular(tmp_path)
    weights = load_file(model_dir / "model.safetensors")
    save_file(
        {name: torch.full_like(w, math.nan) for name, w in weights.items()},
        model_dir / "model.safetensors",
    )
    with pytest.raises(ExportMismatch, match="is nan, not a number the bundle can be checked"):
        export_bundle(model_dir, tmp_path / "edge.zip", log=lambda line: None)
    assert not (tmp_path / "edge.zip").exists()


def test_images_given_as_pixels_score_as_the_same_images_given_as_files(tmp_path):
    model_dir, inputs = _images(tmp_path)
    export_bundle(model_dir, tmp_path / "edge.zip", log=lambda line: None)
    folder = tmp_path / "unpacked"
    with zipfile.ZipFile(tmp_path / "edge.zip") as archive:
        archive.extractall(folder)
    spec = importlib.util.spec_from_file_location("edge_run_under_test", folder / "run.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    predict = runner.load(folder)
    pixels = []
    for item in inputs[:3]:
        with Image.open(io.BytesIO(base64.b64decode(item["image"]))) as image:
            pixels.append({"pixels": np.asarray(image).tolist()})
    assert predict(pixels) == predict(inputs[:3])
