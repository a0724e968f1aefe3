"""The `evaluate` task of a job's child: a retrained challenger and the champion it would replace,
scored on the same held-out rows, overall and per slice of one column, for serving's gate.

The rows are the validation split of the data the challenger trained on, drawn exactly as its
training run drew it (the recipe's own split, seeded by that run's seed), so the challenger never
saw them. The parent stages the challenger in `model_dir` and the champion in
`evaluate.champion_model_dir`; spec `parameters` are the challenger's training parameters and
`evaluate` is {"champion_model_dir": "champion", "split_seed": <training job id>,
"slice_column": "region" | ""}. The result line carries, beside the usual keys,

    "evaluation": {"metric": "accuracy", "higher_is_better": true, "rows": n,
                   "slice_column": "region", "slices_truncated": false,
                   "challenger": {"overall": x, "slices": {"eu": x, ...}},
                   "champion": {"overall": x, "slices": {...}}}

which the parent records as the job's `evaluation` event. Covered: the tabular and text
classifiers (each recipe's `validation_outcomes`). The image classifier and the forecaster have
none yet, so their evaluation fails with EXIT_BAD_INPUT, saying so (and the gate fails the
challenger).

No Django here: this runs in the child.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from jobs.recipes.base import Recipe, RecipeContext, RecipeInputError

# A slice column chosen by a tenant may have a value per row: the gate judges the most frequent
# slices, with enough rows to mean something, and says when it left others out.
MAX_SLICES = 50
MIN_SLICE_ROWS = 5
MAX_SLICE_LABEL = 100
COVERED_RECIPES = ("tabular-classifier", "text-classifier")


def _accuracy(correct: list[bool], slices: list[str | None], kept: list[str]) -> dict[str, Any]:
    by_slice: dict[str, list[bool]] = {value: [] for value in kept}
    for right, value in zip(correct, slices, strict=True):
        if value in by_slice:
            by_slice[value].append(right)
    return {
        "overall": sum(correct) / len(correct),
        "slices": {value: sum(rows) / len(rows) for value, rows in by_slice.items()},
    }


def evaluation_run(ctx: RecipeContext, recipe: Recipe, section: dict[str, Any]) -> dict[str, Any]:
    """The @@result payload of an evaluate task."""
    if recipe.name not in COVERED_RECIPES or not hasattr(recipe, "validation_outcomes"):
        raise RecipeInputError(
            f"The evaluation gate covers {', '.join(COVERED_RECIPES)}; recipe {recipe.name!r} "
            "cannot be evaluated yet."
        )
    if ctx.model_dir is None:
        raise RecipeInputError("An evaluation needs the challenger's model_dir.")
    slice_column = str(section.get("slice_column") or "")
    outcomes, slices = recipe.validation_outcomes(
        ctx,
        model_dirs={
            "challenger": ctx.model_dir,
            "champion": ctx.workdir / Path(section["champion_model_dir"]),
        },
        split_seed=int(section["split_seed"]),
        slice_column=slice_column,
    )
    if not slices:
        raise RecipeInputError("The validation split has no rows to evaluate on.")
    slices = [None if value is None else value[:MAX_SLICE_LABEL] for value in slices]
    counts = Counter(value for value in slices if value is not None)
    kept = [value for value, n in counts.most_common(MAX_SLICES) if n >= MIN_SLICE_ROWS]
    evaluation = {
        "metric": "accuracy",
        "higher_is_better": True,
        "rows": len(slices),
        "slice_column": slice_column,
        "slices_truncated": len(kept) < len(counts),
        **{role: _accuracy(correct, slices, kept) for role, correct in outcomes.items()},
    }
    if slice_column and not counts:
        ctx.log(f"The dataset has no column {slice_column!r} to slice by; overall only.")
    ctx.log(
        f"Evaluated on {len(slices)} held-out rows: challenger accuracy "
        f"{evaluation['challenger']['overall']:.4f}, champion "
        f"{evaluation['champion']['overall']:.4f}."
    )
    return {
        "metrics": {
            "rows": len(slices),
            "challenger_accuracy": evaluation["challenger"]["overall"],
            "champion_accuracy": evaluation["champion"]["overall"],
        },
        "artifacts": {},
        "input_signature": {},
        "parameters": ctx.parameters,
        "evaluation": evaluation,
    }
