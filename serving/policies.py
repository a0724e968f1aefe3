"""Setting a deployment's retrain policy: the one write behind the policy form (and, later, its
API), which checks the whole policy, not each field alone, before the loop acts on it.

The gate's margin and slice tolerance are in the units of the recipe's metric, as differences:
for accuracy a share (0.02 is two points), for the forecaster's MAE the forecast values' own
units. A margin is how much better the challenger must be overall (higher accuracy, lower error);
a tolerance how much worse any slice may be. What a slice is depends on the recipe: a column of
the data for tabular and text, the word "class" (per true class) for images, the word "series"
(per series) for forecasts (see slice_column_help)."""

from __future__ import annotations

import math

from django.db import transaction

from jobs.recipes.catalog import list_recipes
from registry.models import Dataset
from registry.selectors import CODE_RECIPE_PREFIX
from tenants.actors import Actor
from tenants.errors import DomainError
from tenants.services import audit_record

from .models import Deployment, RetrainPolicy
from .selectors import live_metric_of

# What a tenant may set; `last_triggered_at` belongs to the loop.
EDITABLE_FIELDS = (
    "enabled",
    "on_drift",
    "metric_below",
    "on_new_data",
    "every_s",
    "cooldown_s",
    "max_cost_minor",
    "dataset",
    "append_feedback",
    "gate_margin",
    "slice_column",
    "slice_tolerance",
    "auto_promote",
    "canary_percent",
    "bake_s",
    "bake_extensions",
    "rollback_error_rate",
    "rollback_p99_ratio",
    "rollback_metric_drop",
)

DAY_S = 86_400
# A schedule more often than this retrains faster than a retrain and its canary can finish.
MIN_EVERY_S = 600
# The loop's own cost cap per retrain: a typo of a few zeros must not authorise a fortune.
MAX_COST_MINOR = 10_000_000
# A canary too quiet to judge pauses after at most this many more bakes (a day at a 1 h bake).
MAX_BAKE_EXTENSIONS = 24


BOOLEAN_FIELDS = ("enabled", "on_drift", "on_new_data", "append_feedback", "auto_promote")
WHOLE_FIELDS = (
    "every_s",
    "cooldown_s",
    "max_cost_minor",
    "canary_percent",
    "bake_s",
    "bake_extensions",
)
NUMBER_FIELDS = (
    "metric_below",
    "gate_margin",
    "slice_tolerance",
    "rollback_error_rate",
    "rollback_p99_ratio",
    "rollback_metric_drop",
)
NULLABLE_FIELDS = ("metric_below", "every_s")
SLICE_COLUMN_MAX = 100


# What a recipe's slice word means, for the form's help and the error that refuses other names.
SLICE_WORDS = {
    "class": "an image has no columns; enter class to compare per true class (the share of each "
    "class's images recognised)",
    "series": "enter series to compare per series (of the series column the model was trained "
    "with)",
}


class RetrainPolicyInvalid(DomainError):
    code = "retrain_policy_invalid"


def _slice_word(recipe: str) -> str | None:
    """The one slice a recipe without columns to choose from offers (Recipe.gate_slice_by)."""
    recipe_cls = list_recipes().get(recipe)
    return recipe_cls.gate_slice_by if recipe_cls is not None else None


def slice_column_help(recipe: str) -> str:
    """What the slice column means for a deployment of `recipe`, in words for the policy form."""
    word = _slice_word(recipe)
    if word is None:
        return "Compare per value of this column of the data too. Empty: overall only."
    meaning = SLICE_WORDS.get(word, f"enter {word} to compare per {word}")
    return f"{meaning[0].upper()}{meaning[1:]}. Empty: overall only."


def _type_errors(fields: dict) -> dict[str, list[str]]:
    """Values of the wrong kind, which a caller other than the form (an API) might pass."""
    errors: dict[str, list[str]] = {}
    for name, value in fields.items():
        if value is None and name in NULLABLE_FIELDS:
            continue
        if name in BOOLEAN_FIELDS:
            wrong = not isinstance(value, bool)
            message = "Enter true or false."
        elif name in WHOLE_FIELDS:
            wrong = isinstance(value, bool) or not isinstance(value, int)
            message = "Enter a whole number."
        elif name in NUMBER_FIELDS:
            wrong = isinstance(value, bool) or not isinstance(value, int | float)
            message = "Enter a number."
        elif name == "slice_column":
            wrong = not isinstance(value, str) or len(value.strip()) > SLICE_COLUMN_MAX
            message = f"Enter a column name of at most {SLICE_COLUMN_MAX} characters."
        else:
            continue
        if wrong:
            errors[name] = [message]
    return errors


def _between(errors, field, value, low, high, message):
    if value is not None and not low <= value <= high:
        errors.setdefault(field, []).append(message)


def _policy_errors(policy: RetrainPolicy, recipe: str) -> dict[str, list[str]]:
    """Every problem with `policy` as a whole, by field ("" for the policy itself)."""
    errors: dict[str, list[str]] = {}
    for field in (
        "metric_below",
        "gate_margin",
        "slice_tolerance",
        "rollback_error_rate",
        "rollback_p99_ratio",
        "rollback_metric_drop",
    ):
        value = getattr(policy, field)
        if value is not None and not math.isfinite(value):
            errors.setdefault(field, []).append("Enter a finite number.")
    if errors:
        return errors

    metric, higher = live_metric_of(recipe)
    if higher:
        _between(
            errors,
            "metric_below",
            policy.metric_below,
            0,
            1,
            f"The live {metric} is a share from 0 to 1; retrain when it falls below, e.g. 0.85.",
        )
    else:
        _between(
            errors,
            "metric_below",
            policy.metric_below,
            0,
            math.inf,
            f"The live {metric} is an error of 0 or more; retrain when it rises above it.",
        )
    if policy.every_s is not None and policy.every_s < MIN_EVERY_S:
        errors.setdefault("every_s", []).append(
            f"Retrain on a schedule at most every {MIN_EVERY_S} seconds (10 minutes), or leave it "
            "empty for no schedule."
        )
    _between(
        errors,
        "cooldown_s",
        policy.cooldown_s,
        60,
        30 * DAY_S,
        "Wait between 60 seconds and 30 days after a retrain before the next one.",
    )
    _between(
        errors,
        "max_cost_minor",
        policy.max_cost_minor,
        1,
        MAX_COST_MINOR,
        f"A retrain may cost between 1 and {MAX_COST_MINOR} cents.",
    )
    if higher:
        _between(
            errors,
            "gate_margin",
            policy.gate_margin,
            -1,
            1,
            f"The margin a challenger's {metric} must win by is a share between -1 and 1 (0: at "
            "least as good).",
        )
        _between(
            errors,
            "slice_tolerance",
            policy.slice_tolerance,
            0,
            1,
            f"A slice's {metric} may fall behind by a share between 0 and 1.",
        )
    else:
        # An error has the data's units, so no bound but its sign fits every tenant's data; a
        # negative margin lets a challenger be worse overall by up to that much.
        _between(
            errors,
            "slice_tolerance",
            policy.slice_tolerance,
            0,
            math.inf,
            f"A slice's {metric} may rise above the champion's by 0 or more, in the data's units.",
        )
    word = _slice_word(recipe)
    if word is not None and policy.slice_column not in ("", word):
        errors.setdefault("slice_column", []).append(
            f"Recipe {recipe} cannot slice by {policy.slice_column!r}: "
            f"{SLICE_WORDS.get(word, f'enter {word}')}, or leave it empty for overall only."
        )
    _between(
        errors,
        "canary_percent",
        policy.canary_percent,
        1,
        99,
        "A canary takes between 1% and 99% of live traffic; 100% is a promotion, not a canary.",
    )
    _between(
        errors,
        "bake_s",
        policy.bake_s,
        60,
        7 * DAY_S,
        "A canary bakes for between 60 seconds and 7 days before each step.",
    )
    _between(
        errors,
        "bake_extensions",
        policy.bake_extensions,
        0,
        MAX_BAKE_EXTENSIONS,
        f"A canary too quiet to judge bakes between 0 and {MAX_BAKE_EXTENSIONS} more times before "
        "it pauses for a person.",
    )
    _between(
        errors,
        "rollback_error_rate",
        policy.rollback_error_rate,
        0,
        1,
        "Roll back when the canary's error rate exceeds the stable one's by a share between 0 and "
        "1, e.g. 0.02.",
    )
    _between(
        errors,
        "rollback_p99_ratio",
        policy.rollback_p99_ratio,
        1,
        100,
        "Roll back when the canary's p99 latency is this many times the stable one's, from 1 to "
        "100.",
    )
    _between(
        errors,
        "rollback_metric_drop",
        policy.rollback_metric_drop,
        0,
        math.inf,
        "Roll back when the live metric drops by this much or more; 0 or more.",
    )
    if policy.on_new_data and policy.dataset_id is None:
        errors.setdefault("dataset", []).append(
            "Retraining on new data watches a dataset for new versions: choose the dataset."
        )
    if policy.enabled and not errors and not _has_trigger(policy):
        errors.setdefault("", []).append(
            "An enabled policy needs a trigger: drift, a live metric threshold, new data or a "
            "schedule. Turn one on, or disable the policy."
        )
    return errors


def _has_trigger(policy: RetrainPolicy) -> bool:
    return bool(
        policy.on_drift or policy.metric_below is not None or policy.on_new_data or policy.every_s
    )


def _stored(policy: RetrainPolicy, name: str):
    """A field's value as the audit log records it: the dataset by its id."""
    return policy.dataset_id if name == "dataset" else getattr(policy, name)


@transaction.atomic
def retrain_policy_set(*, deployment: Deployment, actor: Actor, **fields) -> RetrainPolicy:
    """Create or change `deployment`'s retrain policy with `fields` (EDITABLE_FIELDS; the rest
    keep their value or default). Nothing is written unless the resulting policy is valid as a
    whole; the audit event names each changed field with its old and new value."""
    unknown = sorted(set(fields) - set(EDITABLE_FIELDS))
    if unknown:
        raise RetrainPolicyInvalid(
            f"A retrain policy has no field {', '.join(unknown)}.",
            fields={name: ["Not a retrain policy field."] for name in unknown},
        )
    wrong = _type_errors(fields)
    if wrong:
        raise RetrainPolicyInvalid("The retrain policy is not valid.", fields=wrong)
    if deployment.recipe.startswith(CODE_RECIPE_PREFIX):
        raise RetrainPolicyInvalid(
            f"A deployment of own code ({deployment.recipe}) has no retrain policy: the loop's "
            "gate scores a recipe's models on the held-out data that recipe defines, which a "
            "package does not declare. Retrain by running the package, then route its new "
            "version.",
            fields={"": ["Own code is retrained by hand."]},
        )
    organization = deployment.organization
    dataset = fields.get("dataset")
    if dataset is not None and (
        not isinstance(dataset, Dataset) or dataset.organization_id != organization.pk
    ):
        # Another tenant's dataset reads as a missing one.
        raise RetrainPolicyInvalid(
            "That dataset does not exist.", fields={"dataset": ["That dataset does not exist."]}
        )
    policy = (
        RetrainPolicy.objects.for_organization(organization)
        .select_for_update()
        .filter(deployment=deployment)
        .first()
    )
    created = policy is None
    if created:
        policy = RetrainPolicy(organization=organization, deployment=deployment)
    before = {name: _stored(policy, name) for name in fields}
    for name, value in fields.items():
        setattr(policy, name, value.strip() if isinstance(value, str) else value)
    errors = _policy_errors(policy, deployment.recipe)
    if errors:
        first = next(iter(errors.values()))[0]
        raise RetrainPolicyInvalid(f"The retrain policy is not valid: {first}", fields=errors)
    # Whoever saves the policy is whom the loop acts as from now on (with their scopes).
    acts_as = (
        actor.api_key.created_by_id if actor.api_key else actor.user and actor.user.pk,
        actor.api_key and actor.api_key.pk,
    )
    handed_over = acts_as != (policy.set_by_id, policy.set_by_key_id)
    policy.set_by_id, policy.set_by_key_id = acts_as
    policy.set_with_key = actor.api_key is not None
    policy.save()
    changed = {
        name: [before[name], _stored(policy, name)]
        for name in fields
        if before[name] != _stored(policy, name)
    }
    if created or changed or handed_over:
        audit_record(
            organization=organization,
            actor=actor,
            action="serving.retrain_policy.set",
            target=deployment,
            data={"created": created, "changed": changed, "loop_acts_as": actor.label},
        )
    return policy
