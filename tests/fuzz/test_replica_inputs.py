"""Hostile request bodies against every recipe's online predictor, through the replica's own
body parsing: each answer is either outputs (one per input, valid JSON) or a RecipeInputError,
which the replica turns into a 400. Anything else would be a 500 to the tenant."""

from __future__ import annotations

import base64
import json
import zipfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.recipes.base import RecipeInputError
from jobs.recipes.images import ImageClassifier
from jobs.recipes.tabular import TabularClassifier
from jobs.recipes.text import TextClassifier
from jobs.recipes.timeseries import TimeSeriesForecaster
from jobs.runner.serve import _inputs, _Refused
from jobs.samples.images import write_image_sample
from jobs.samples.tabular import write_tabular_sample
from jobs.samples.text import write_text_sample
from jobs.samples.timeseries import write_timeseries_sample
from tests.jobs.recipe_helpers import one_torch_thread, read_csv, recipe_context

MAX_ITEMS = 20
EXAMPLES = settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**320), max_value=10**320)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def predictors(tmp_path_factory):
    """Each recipe's predictor, on a model it trained in a second on its sample data, and a
    valid input of each."""
    root = tmp_path_factory.mktemp("models")
    made = {}
    with one_torch_thread():
        data = root / "churn.csv"
        write_tabular_sample(data, rows=200, seed=1)
        row = read_csv(data)[0]
        valid = {k: (float(v) if k != "plan" and k != "region" else v) for k, v in row.items()}
        valid.pop("label")
        made["tabular"] = (
            _train(TabularClassifier, root / "t", data, {"target": "label", "epochs": 1}),
            valid,
        )
        data = root / "reviews.csv"
        write_text_sample(data, rows=200, seed=1)
        made["text"] = (
            _train(
                TextClassifier,
                root / "x",
                data,
                {"text_column": "text", "target": "label", "epochs": 1},
            ),
            {"text": "great kettle"},
        )
        data = root / "hourly.csv"
        write_timeseries_sample(data, points=24 * 12, seed=1)
        made["timeseries"] = (
            _train(
                TimeSeriesForecaster,
                root / "s",
                data,
                {"window": 8, "horizon": 3, "epochs": 1, "hidden_size": 4, "season_length": 8},
            ),
            {"history": [float(r["value"]) for r in read_csv(data)][-8:]},
        )
        data = root / "shapes.zip"
        write_image_sample(data, per_class=4, size=8, seed=1)
        with zipfile.ZipFile(data) as archive:
            image = archive.read(sorted(archive.namelist())[0])
        made["image"] = (
            _train(
                ImageClassifier,
                root / "i",
                data,
                {"image_size": 8, "epochs": 1, "width": 4},
                dataset_format="image_folder_zip",
            ),
            {"image": base64.b64encode(image).decode()},
        )
    return made


def _train(recipe, workdir, data, parameters, **context):
    workdir.mkdir()
    ctx = recipe_context(recipe, workdir, data, parameters, seed=1, **context)
    recipe().train(ctx)
    return recipe.online_predictor(ctx.output_dir)


def _answers_or_refuses(predict, body: bytes) -> None:
    try:
        inputs = _inputs(body, MAX_ITEMS)
    except _Refused:
        return
    try:
        with one_torch_thread():
            outputs = predict(inputs)
    except RecipeInputError:
        return
    assert len(outputs) == len(inputs)
    json.dumps(outputs, allow_nan=False)


def _mutated(valid: dict, key: str, value) -> dict:
    return {**valid, key: value}


@pytest.mark.parametrize("recipe", ["tabular", "text", "timeseries", "image"])
@EXAMPLES
@given(payload=json_values)
def test_any_json_body_is_answered_or_refused_in_words(predictors, recipe, payload):
    predict, _valid = predictors[recipe]
    _answers_or_refuses(predict, json.dumps({"inputs": payload}).encode())
    _answers_or_refuses(predict, json.dumps({"inputs": [payload]}).encode())


@pytest.mark.parametrize("recipe", ["tabular", "text", "timeseries", "image"])
@EXAMPLES
@given(data=st.data(), value=json_values)
def test_a_valid_input_with_any_field_replaced_is_answered_or_refused(
    predictors, recipe, data, value
):
    predict, valid = predictors[recipe]
    key = data.draw(st.sampled_from([*valid, "extra"]))
    _answers_or_refuses(
        predict, json.dumps({"inputs": [valid, _mutated(valid, key, value)]}).encode()
    )


@EXAMPLES
@given(
    history=st.lists(
        st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(10**300), 10**300),
        min_size=8,
        max_size=40,
    )
)
def test_any_history_of_numbers_is_forecast_or_refused(predictors, history):
    predict, _valid = predictors["timeseries"]
    _answers_or_refuses(predict, json.dumps({"inputs": [{"history": history}]}).encode())
