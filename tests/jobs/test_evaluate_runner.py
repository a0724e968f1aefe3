"""The evaluate task's scoring, on outcomes a recipe reports: overall and per slice, with the
slices a tenant's column may multiply kept to the frequent ones."""

from pathlib import Path

import pytest

from jobs.recipes.base import RecipeContext, RecipeInputError
from jobs.runner.evaluate import MAX_SLICES, evaluation_run


class _Recipe:
    name = "tabular-classifier"

    def __init__(self, outcomes, slices):
        self.outcomes, self.slices = outcomes, slices

    def validation_outcomes(self, ctx, *, model_dirs, split_seed, slice_column):
        assert set(model_dirs) == {"challenger", "champion"} and split_seed == 42
        return self.outcomes, self.slices


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


def test_a_recipe_the_gate_does_not_cover_is_refused_saying_so(tmp_path):
    recipe = _Recipe({}, [])
    recipe.name = "image-classifier"
    with pytest.raises(RecipeInputError, match="cannot be evaluated yet"):
        evaluation_run(_ctx(tmp_path), recipe, SECTION)
