"""The `evaluate` task of a job's child: a retrained challenger and the champion it would replace,
scored on the same held-out rows, overall and per slice, for serving's gate.

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

which the parent records as the job's `evaluation` event. Every built-in recipe is covered, each
by its `validation_outcomes` and on its own metric (`gate_metric`), a score's mean over the rows:

- tabular and text classifiers: accuracy (higher is better) on the validation rows; slices are
  the values of the policy's column in the dataset.
- image classifier: accuracy on the validation images; an image has no columns, so its one
  slicing is by true class, asked for with the slice column "class".
- time-series forecaster: the mean absolute error (lower is better) over the validation windows
  at the end of each series, the `val_mae` its training reports; slice column "series" slices by
  the series column it was trained with.

A slice column a recipe cannot slice by leaves the evaluation overall only, saying so in the log.
A recipe without `validation_outcomes` (a plugin's) fails with EXIT_BAD_INPUT, saying so, and the
gate fails the challenger.

No Django here: this runs in the child.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jobs.recipes.base import Recipe, RecipeContext, RecipeInputError

# A slice column chosen by a tenant may have a value per row: the gate judges the most frequent
# slices, with enough rows to mean something, and says when it left others out.
MAX_SLICES = 50
MIN_SLICE_ROWS = 5
MAX_SLICE_LABEL = 100


def _mean(scores: Sequence[float]) -> float:
    return math.fsum(scores) / len(scores)


def _scored(scores: Sequence[float], slices: list[str | None], kept: list[str]) -> dict[str, Any]:
    """A model's metric overall and per kept slice: the mean of its row scores there."""
    by_slice: dict[str, list[float]] = {value: [] for value in kept}
    for score, value in zip(scores, slices, strict=True):
        if value in by_slice:
            by_slice[value].append(score)
    return {
        "overall": _mean(scores),
        "slices": {value: _mean(rows) for value, rows in by_slice.items()},
    }


def evaluation_run(ctx: RecipeContext, recipe: Recipe, section: dict[str, Any]) -> dict[str, Any]:
    """The @@result payload of an evaluate task."""
    if ctx.model_dir is None:
        raise RecipeInputError("An evaluation needs the challenger's model_dir.")
    metric, higher_is_better = recipe.gate_metric
    slice_column = str(section.get("slice_column") or "")
    slice_by = recipe.gate_slice_by
    if slice_column and slice_by is not None and slice_column != slice_by:
        ctx.log(
            f"Recipe {recipe.name!r} slices only by {slice_by!r}, not {slice_column!r}; "
            "overall only."
        )
        slice_column = ""
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
    for role, scores in outcomes.items():
        if not all(math.isfinite(score) for score in scores):
            raise RecipeInputError(
                f"The {role}'s {metric} is not a finite number on these rows; its outputs "
                "overflow on this data."
            )
    slices = [None if value is None else value[:MAX_SLICE_LABEL] for value in slices]
    counts = Counter(value for value in slices if value is not None)
    kept = [value for value, n in counts.most_common(MAX_SLICES) if n >= MIN_SLICE_ROWS]
    evaluation = {
        "metric": metric,
        "higher_is_better": higher_is_better,
        "rows": len(slices),
        "slice_column": slice_column,
        "slices_truncated": len(kept) < len(counts),
        **{role: _scored(scores, slices, kept) for role, scores in outcomes.items()},
    }
    if slice_column and slice_by is None and not counts:
        ctx.log(f"The dataset has no column {slice_column!r} to slice by; overall only.")
    ctx.log(
        f"Evaluated on {len(slices)} held-out rows: challenger {metric} "
        f"{evaluation['challenger']['overall']:.4f}, champion "
        f"{evaluation['champion']['overall']:.4f}."
    )
    return {
        "metrics": {
            "rows": len(slices),
            f"challenger_{metric}": evaluation["challenger"]["overall"],
            f"champion_{metric}": evaluation["champion"]["overall"],
        },
        "artifacts": {},
        "input_signature": {},
        "parameters": ctx.parameters,
        "evaluation": evaluation,
    }
