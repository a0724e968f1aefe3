"""The evaluate task's scoring, on outcomes a recipe reports: overall and per slice on the recipe's
own metric, with the slices a tenant's column may multiply kept to the frequent ones."""

import math
from pathlib import Path

import pytest

from jobs.recipes.base import RecipeContext, RecipeInputError
from jobs.recipes.catalog import list_recipes
from jobs.recipes.tabular import TabularClassifier
from jobs.recipes.timeseries import TimeSeriesForecaster
from jobs.runner.evaluate import MAX_SLICES, evaluation_run


class _Outcomes:
    """Reports the given outcomes, as a recipe scoring real models would."""

    def __init__(self, outcomes, slices):
        self.outcomes, self.slices = outcomes, slices
        self.asked_slice_column = None

    def validation_outcomes(self, ctx, *, model_dirs, split_seed, slice_column):
        assert set(model_dirs) == {"challenger", "champion"} and split_seed == 42
        self.asked_slice_column = slice_column
        return self.outcomes, self.slices


class _Recipe(_Outcomes, TabularClassifier):
    pass


class _Forecaster(_Outcomes, TimeSeriesForecaster):
    pass


def _ctx(tmp_path: Path) -> RecipeContext:
    return RecipeContext(
        workdir=tmp_path,
        dataset_path=tmp_path / "data.csv",
        dataset_format="csv",
        parameters={"target": "y"},
        seed=1,
        output_dir=tmp_path / "out",
        checkpoint_dir=tmp_path / "ck",
        checkpoint_every_s=3600.0,
        model_dir=tmp_path / "model",
        devices=["cpu"],
        emit=lambda _line: None,
    )


SECTION = {"champion_model_dir": "champion", "split_seed": 42, "slice_column": "region"}


def test_scores_overall_and_per_slice(tmp_path):
    slices = ["eu"] * 10 + ["us"] * 10 + ["rare"] * 2
    challenger = [True] * 10 + [True] * 5 + [False] * 5 + [True, True]
    champion = [False] * 10 + [True] * 10 + [False, False]
    result = evaluation_run(
        _ctx(tmp_path),
        _Recipe({"challenger": challenger, "champion": champion}, slices),
        SECTION,
    )
    evaluation = result["evaluation"]
    assert evaluation["rows"] == 22
    assert evaluation["challenger"] == {
        "overall": pytest.approx(17 / 22),
        "slices": {"eu": 1.0, "us": 0.5},
    }
    assert evaluation["champion"]["slices"] == {"eu": 0.0, "us": 1.0}
    # "rare" has too few rows to judge a slice on.
    assert evaluation["slices_truncated"] is True


def test_a_column_with_a_value_per_row_yields_at_most_the_frequent_slices(tmp_path):
    slices = [f"id-{i}" for i in range(500)] + ["x" * 1000] * (MAX_SLICES * 10)
    outcomes = [True] * len(slices)
    evaluation = evaluation_run(
        _ctx(tmp_path), _Recipe({"challenger": outcomes, "champion": outcomes}, slices), SECTION
    )["evaluation"]
    assert list(evaluation["challenger"]["slices"]) == ["x" * 100]


def test_an_error_metric_is_the_mean_error_overall_and_per_slice(tmp_path):
    slices = ["north"] * 5 + ["south"] * 5
    challenger = [1.0] * 5 + [3.0] * 5
    champion = [2.0] * 10
    section = SECTION | {"slice_column": "series"}
    result = evaluation_run(
        _ctx(tmp_path),
        _Forecaster({"challenger": challenger, "champion": champion}, slices),
        section,
    )
    evaluation = result["evaluation"]
    assert (evaluation["metric"], evaluation["higher_is_better"]) == ("mae", False)
    assert evaluation["challenger"] == {"overall": 2.0, "slices": {"north": 1.0, "south": 3.0}}
    assert evaluation["champion"]["slices"] == {"north": 2.0, "south": 2.0}
    assert result["metrics"] == {"rows": 10, "challenger_mae": 2.0, "champion_mae": 2.0}


def test_a_slice_column_the_recipe_cannot_slice_by_leaves_it_overall_only(tmp_path):
    ctx = _ctx(tmp_path)
    lines = []
    ctx.emit = lines.append
    recipe = _Forecaster({"challenger": [1.0] * 5, "champion": [2.0] * 5}, [None] * 5)
    evaluation = evaluation_run(ctx, recipe, SECTION)["evaluation"]
    assert recipe.asked_slice_column == "" and evaluation["slice_column"] == ""
    assert evaluation["challenger"]["slices"] == {}
    assert any("slices only by 'series', not 'region'" in line for line in lines)


def test_scores_that_are_not_finite_are_refused_in_words(tmp_path):
    recipe = _Forecaster({"challenger": [1.0, math.inf], "champion": [1.0, 2.0]}, [None, None])
    with pytest.raises(RecipeInputError, match="challenger's mae is not a finite number"):
        evaluation_run(_ctx(tmp_path), recipe, SECTION)


def test_every_built_in_recipe_can_be_evaluated_and_a_plugin_without_outcomes_is_refused(
    tmp_path,
):
    from jobs.recipes.base import Recipe

    for recipe in list_recipes().values():
        assert recipe.validation_outcomes is not Recipe.validation_outcomes, recipe.name

    class Plugin(TabularClassifier):
        name = "someones-recipe"
        validation_outcomes = Recipe.validation_outcomes

    with pytest.raises(RecipeInputError, match="cannot be evaluated by the gate"):
        evaluation_run(_ctx(tmp_path), Plugin(), SECTION)
