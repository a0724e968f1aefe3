"""Every recipe, on its sample data: train, register the model, fetch it back, predict.

The training and prediction code is the recipes'; what this adds is the round trip through the
registry (upload, validation of safetensors and config, download by key).
"""

import csv
import json
from pathlib import Path

import pytest
from django.test import override_settings

from jobs.recipes.base import RecipeContext, validate_parameters
from jobs.recipes.catalog import get_recipe
from jobs.samples import (
    write_image_sample,
    write_tabular_sample,
    write_text_sample,
    write_timeseries_sample,
)
from registry.services import model_version_register, registered_model_create
from registry.storage import get_storage
from tenants.actors import Actor

pytestmark = pytest.mark.django_db

# recipe -> (sample writer and file name, dataset format, small parameters, result metric)
CASES = {
    "tabular-classifier": (
        lambda p: write_tabular_sample(p, rows=600),
        "data.csv",
        "csv",
        {"target": "label", "epochs": 4},
        "val_accuracy",
    ),
    "image-classifier": (
        lambda p: write_image_sample(p, per_class=20, size=16),
        "shapes.zip",
        "image_folder_zip",
        {"image_size": 16, "epochs": 2, "width": 8},
        "val_accuracy",
    ),
    "text-classifier": (
        lambda p: write_text_sample(p, rows=300),
        "reviews.csv",
        "csv",
        {"text_column": "text", "target": "label", "epochs": 3},
        "val_accuracy",
    ),
    "timeseries-forecaster": (
        lambda p: write_timeseries_sample(p, points=24 * 20),
        "load.csv",
        "csv",
        {"window": 24, "horizon": 6, "epochs": 3},
        "val_mae",
    ),
}


def _context(tmp: Path, dataset: Path, fmt: str, parameters: dict, **extra) -> RecipeContext:
    for folder in ("out", "checkpoints"):
        (tmp / folder).mkdir(exist_ok=True)
    return RecipeContext(
        workdir=tmp,
        dataset_path=dataset,
        dataset_format=fmt,
        parameters=parameters,
        seed=1,
        output_dir=tmp / "out",
        checkpoint_dir=tmp / "checkpoints",
        devices=["cpu"],
        emit=lambda line: None,
        **extra,
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_recipe_trains_registers_and_predicts_from_the_registry(name, org, owner, tmp_path):
    write, filename, fmt, parameters, metric = CASES[name]
    dataset = tmp_path / filename
    write(dataset)
    recipe = get_recipe(name)
    with override_settings(STORAGE_BACKEND="local", STORAGE_LOCAL_ROOT=str(tmp_path / "storage")):
        train_dir = tmp_path / "train"
        train_dir.mkdir()
        result = recipe().train(
            _context(train_dir, dataset, fmt, validate_parameters(recipe, parameters))
        )
        assert isinstance(result.metrics[metric], float)

        registered = registered_model_create(organization=org, name=name, actor=Actor(user=owner))
        config = (train_dir / result.artifacts["config.json"]).read_text()
        version = model_version_register(
            registered_model=registered,
            weights_path=train_dir / result.artifacts["model.safetensors"],
            config=json.loads(config),
            actor=Actor(user=owner),
            recipe_name=name,
            metrics=result.metrics,
        )

        model_dir = tmp_path / "model"
        model_dir.mkdir()
        for artifact in version.artifacts.all():
            with get_storage().open(artifact.storage_key) as source:
                (model_dir / artifact.name).write_bytes(source.read())
        predict_dir = tmp_path / "predict"
        predict_dir.mkdir()
        predicted = recipe().predict(_context(predict_dir, dataset, fmt, {}, model_dir=model_dir))
    with (predict_dir / predicted.artifacts["predictions.csv"]).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and "prediction" in rows[0]
    assert predicted.metrics["rows"] == len(rows)
