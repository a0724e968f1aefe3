"""Every recipe serves online: a model trained by the recipe on its sample data, loaded once by
`online_predictor`, answers JSON inputs with the replica contract's outputs, and refuses inputs
it cannot read with a RecipeInputError naming the input."""

from __future__ import annotations

import base64
import io
import zipfile

import pytest
from PIL import Image

from jobs.recipes.base import RecipeInputError
from jobs.recipes.images import ImageClassifier
from jobs.recipes.tabular import TabularClassifier
from jobs.recipes.text import TextClassifier
from jobs.recipes.timeseries import TimeSeriesForecaster
from jobs.samples.images import CLASSES, write_image_sample
from jobs.samples.tabular import write_tabular_sample
from jobs.samples.text import write_text_sample
from jobs.samples.timeseries import write_timeseries_sample
from registry.formats.image_headers import MAX_IMAGE_PIXELS
from tests.jobs.recipe_helpers import one_torch_thread, read_csv, recipe_context


@pytest.fixture(autouse=True, scope="module")
def _like_the_child():
    with one_torch_thread():
        yield


def _trained(recipe, tmp_path, dataset, parameters, **context):
    ctx = recipe_context(recipe, tmp_path, dataset, parameters, seed=3, **context)
    assert recipe().train(ctx) is not None
    return ctx.output_dir


def _is_classification(output: dict, classes: set[str]) -> None:
    assert output["label"] in classes
    assert set(output["probabilities"]) == classes
    assert sum(output["probabilities"].values()) == pytest.approx(1.0)
    assert output["probabilities"][output["label"]] == max(output["probabilities"].values())


def test_the_tabular_classifier_answers_rows_and_names_a_bad_one(tmp_path):
    dataset = tmp_path / "churn.csv"
    write_tabular_sample(dataset, rows=300, seed=1)
    model_dir = _trained(
        TabularClassifier,
        tmp_path,
        dataset,
        {"target": "label", "epochs": 2, "hidden_sizes": [8], "batch_size": 64},
    )
    predict = TabularClassifier.online_predictor(model_dir)
    rows = read_csv(dataset)[:2]
    inputs = [
        {
            "age": int(row["age"]),
            "monthly_spend": float(row["monthly_spend"]) if row["monthly_spend"] else None,
            "tenure_months": int(row["tenure_months"]),
            "support_calls": int(row["support_calls"]),
            "plan": row["plan"],
            "region": row["region"],
        }
        for row in rows
    ]
    outputs = predict(inputs)
    assert len(outputs) == 2
    for output in outputs:
        _is_classification(output, {"0", "1"})
    with pytest.raises(RecipeInputError, match=r"inputs\[1\], column 'age': expected a number"):
        predict([inputs[0], {**inputs[1], "age": "old"}])
    with pytest.raises(RecipeInputError, match=r"inputs\[0\] has no column 'plan'"):
        predict([{k: v for k, v in inputs[0].items() if k != "plan"}])


def test_the_image_classifier_answers_base64_files_and_refuses_what_is_not_an_image(tmp_path):
    dataset = tmp_path / "shapes.zip"
    write_image_sample(dataset, per_class=12, size=16, seed=2)
    model_dir = _trained(
        ImageClassifier,
        tmp_path,
        dataset,
        {"image_size": 16, "epochs": 1, "batch_size": 16, "width": 4},
        dataset_format="image_folder_zip",
    )
    predict = ImageClassifier.online_predictor(model_dir)
    with zipfile.ZipFile(dataset) as archive:
        files = [archive.read(name) for name in sorted(archive.namelist())[:2]]
    outputs = predict([{"image": base64.b64encode(data).decode()} for data in files])
    assert len(outputs) == 2
    for output in outputs:
        _is_classification(output, set(CLASSES))
    with pytest.raises(RecipeInputError, match=r"inputs\[0\].image is not valid base64"):
        predict([{"image": "not base64!"}])
    with pytest.raises(RecipeInputError, match=r"inputs\[0\].image: The file is not a readable"):
        predict([{"image": base64.b64encode(b"GIF89a but not really").decode()}])
    with pytest.raises(RecipeInputError, match=r"inputs\[0\] must be an object"):
        predict(["plain text"])
    side = int(MAX_IMAGE_PIXELS**0.5) + 2
    huge = io.BytesIO()
    Image.new("1", (side, side)).save(huge, format="PNG")  # a small file of too many pixels
    with pytest.raises(RecipeInputError, match="over our limit"):
        predict([{"image": base64.b64encode(huge.getvalue()).decode()}])


def test_the_text_classifier_answers_texts(tmp_path):
    dataset = tmp_path / "reviews.csv"
    write_text_sample(dataset, rows=300, seed=3)
    model_dir = _trained(
        TextClassifier,
        tmp_path,
        dataset,
        {"text_column": "text", "target": "label", "epochs": 2, "embedding_dim": 8},
    )
    predict = TextClassifier.online_predictor(model_dir)
    outputs = predict([{"text": "I love this kettle, it works great"}, {"text": ""}])
    assert len(outputs) == 2
    for output in outputs:
        _is_classification(output, {"positive", "negative", "neutral"})
    with pytest.raises(RecipeInputError, match=r"inputs\[0\].text must be text"):
        predict([{"text": 3}])


def test_the_forecaster_answers_histories_with_a_horizon_of_values(tmp_path):
    dataset = tmp_path / "hourly.csv"
    write_timeseries_sample(dataset, points=24 * 20, seed=1)
    model_dir = _trained(
        TimeSeriesForecaster,
        tmp_path,
        dataset,
        {"window": 24, "horizon": 6, "epochs": 2, "hidden_size": 8},
    )
    predict = TimeSeriesForecaster.online_predictor(model_dir)
    history = [float(row["value"]) for row in read_csv(dataset)][-30:]
    outputs = predict([{"history": history}, {"history": history[-24:], "series": "unseen"}])
    assert [len(output["forecast"]) for output in outputs] == [6, 6]
    # The sample swings about 10 around a level near 50-60: a forecast lands in that range.
    assert all(20 < value < 100 for output in outputs for value in output["forecast"])
    with pytest.raises(RecipeInputError, match=r"inputs\[0\].history has 3 values"):
        predict([{"history": [1.0, 2.0, 3.0]}])
    with pytest.raises(RecipeInputError, match=r"inputs\[1\].history must hold only finite"):
        predict([{"history": history}, {"history": [*history[:-1], "7"]}])
