"""Hyperparameter sweeps: fan out trial jobs, follow them, and mark the best."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import random
import secrets
from dataclasses import replace

from django.db import transaction
from django.utils import timezone

from jobs.models import TERMINAL_STATES, JobState, ResourceClass, Sweep
from jobs.recipes.catalog import get_recipe
from registry.models import DatasetVersion
from registry.services import model_alias_set
from registry.services.datasets import validate_name
from tenants.actors import Actor
from tenants.errors import ConflictError, DomainError
from tenants.models import Organization
from tenants.services import audit_record

from .submission import JobOptions, job_admit, job_cancel, training_spec

logger = logging.getLogger(__name__)

MAX_TRIALS = 50
BEST_ALIAS = "best"


def _axis(name: str, spec) -> list | tuple[float, float, bool, bool]:
    """A grid axis (list of values) or a range (low, high, log, integer)."""
    if (
        isinstance(spec, dict)
        and "values" in spec
        and isinstance(spec["values"], list)
        and spec["values"]
    ):
        return spec["values"]
    if isinstance(spec, dict) and {"min", "max"} <= spec.keys():
        low, high = spec["min"], spec["max"]
        if not (isinstance(low, int | float) and isinstance(high, int | float) and low < high):
            raise DomainError(
                f"{name}: min must be a number below max.", fields={f"space.{name}": ["min < max"]}
            )
        if spec.get("log") and low <= 0:
            raise DomainError(
                f"{name}: a log range needs min > 0.", fields={f"space.{name}": ["min > 0"]}
            )
        integer = isinstance(low, int) and isinstance(high, int) and not spec.get("log")
        return (float(low), float(high), bool(spec.get("log")), integer)
    raise DomainError(
        f"{name}: give {{'values': [...]}} or {{'min': a, 'max': b, 'log': false}}.",
        fields={f"space.{name}": ["A values list or a min/max range."]},
    )


def _sample(axis, rng: random.Random):
    if isinstance(axis, list):
        return rng.choice(axis)
    low, high, log, integer = axis
    if log:
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    return rng.randint(int(low), int(high)) if integer else rng.uniform(low, high)


def sweep_points(*, space: dict, strategy: str, count: int, seed: int) -> list[dict]:
    axes = {name: _axis(name, spec) for name, spec in space.items()}
    if strategy == Sweep.Strategy.GRID:
        ranges = [name for name, axis in axes.items() if not isinstance(axis, list)]
        if ranges:
            raise DomainError(
                "A grid needs a values list for every parameter; use random search for ranges.",
                fields={f"space.{name}": ["Use values for a grid."] for name in ranges},
            )
        names = list(axes)
        return [
            dict(zip(names, combo, strict=True))
            for combo in itertools.islice(itertools.product(*axes.values()), count)
        ]
    rng = random.Random(seed)  # noqa: S311  reproducible search, not security
    return [{name: _sample(axis, rng) for name, axis in axes.items()} for _ in range(count)]


@transaction.atomic
def sweep_create(
    *,
    organization: Organization,
    actor: Actor,
    name: str,
    recipe: str,
    base_parameters: dict,
    space: dict,
    strategy: str,
    trial_count: int,
    metric: str,
    mode: str,
    dataset_version: DatasetVersion,
    resource_class: ResourceClass,
    gpu_count: int = 1,
    max_runtime_s: int = 3600,
    labels: dict | None = None,
) -> Sweep:
    """Create the sweep and submit all its trials, or nothing if any trial is refused."""
    name = validate_name(name)
    if not 1 <= trial_count <= MAX_TRIALS:
        raise DomainError(
            f"A sweep runs 1 to {MAX_TRIALS} trials.",
            fields={"trial_count": [f"1 to {MAX_TRIALS}."]},
        )
    if not isinstance(space, dict) or not space:
        raise DomainError("Give at least one parameter to search.", fields={"space": ["Required."]})
    recipe_cls = get_recipe(recipe)
    unknown = sorted(set(space) - set(recipe_cls.parameter_schema.get("properties", {})))
    if unknown:
        raise DomainError(
            f"{recipe} has no parameter {', '.join(unknown)}.",
            fields={"space": [f"Unknown: {', '.join(unknown)}."]},
        )
    seed = secrets.randbelow(2**31)
    points = sweep_points(space=space, strategy=strategy, count=trial_count, seed=seed)
    trials = [
        training_spec(
            organization=organization,
            recipe=recipe,
            parameters={**base_parameters, **point},
            dataset_version=dataset_version,
            gpu_count=gpu_count,
            output_model_name=name,
        )
        for point in points
    ]
    sweep = Sweep.objects.create(
        organization=organization,
        name=name,
        recipe=recipe,
        base_parameters=base_parameters,
        space=space,
        strategy=strategy,
        trial_count=len(points),
        seed=seed,
        metric=metric,
        mode=mode,
        created_by=actor.api_key.created_by if actor.api_key else actor.user,
    )
    options = JobOptions(
        resource_class=resource_class,
        gpu_count=gpu_count,
        max_runtime_s=max_runtime_s,
        labels={**(labels or {}), "sweep": str(sweep.pk)},
    )
    for spec in trials:
        job_admit(
            organization=organization,
            actor=actor,
            spec=replace(spec, sweep=sweep, moves_alias=BEST_ALIAS),
            options=options,
        )
    audit_record(
        organization=organization,
        actor=actor,
        action="sweep.create",
        target=sweep,
        data={"trials": len(points), "metric": metric, "mode": mode},
    )
    return sweep


@transaction.atomic
def sweep_cancel(*, sweep: Sweep, actor: Actor) -> Sweep:
    sweep = Sweep.objects.select_for_update().get(pk=sweep.pk)
    if sweep.state != Sweep.State.RUNNING:
        raise ConflictError(f"The sweep is already {sweep.state}.")
    for job in sweep.trials.exclude(state__in=[*TERMINAL_STATES, JobState.CANCELLING]):
        # A trial may end between the query and its lock; it needs no cancelling then.
        with contextlib.suppress(ConflictError):
            job_cancel(job=job, actor=actor)
    sweep.state, sweep.finished_at = Sweep.State.CANCELLED, timezone.now()
    sweep.save(update_fields=["state", "finished_at"])
    audit_record(organization=sweep.organization, actor=actor, action="sweep.cancel", target=sweep)
    return sweep


def sweeps_progress() -> int:
    """Finish sweeps whose trials have all ended: the best trial's model gets the `best` alias."""
    finished = 0
    for sweep in Sweep.objects.filter(state=Sweep.State.RUNNING).select_related("organization"):
        if sweep.trials.exclude(state__in=TERMINAL_STATES).exists():
            continue
        with transaction.atomic():
            sweep = Sweep.objects.select_for_update().get(pk=sweep.pk)
            if sweep.state != Sweep.State.RUNNING:
                continue
            scored = [
                (job.output_model_version.metrics[sweep.metric], job)
                for job in sweep.trials.filter(state=JobState.SUCCEEDED).select_related(
                    "output_model_version"
                )
                if job.output_model_version
                and isinstance(job.output_model_version.metrics.get(sweep.metric), int | float)
            ]
            sweep.finished_at = timezone.now()
            if scored:
                pick = max if sweep.mode == Sweep.Mode.MAX else min
                _score, best = pick(scored, key=lambda pair: pair[0])
                sweep.best_job, sweep.state = best, Sweep.State.SUCCEEDED
                version = best.output_model_version
                try:
                    with transaction.atomic():
                        model_alias_set(
                            registered_model=version.registered_model,
                            alias=BEST_ALIAS,
                            version=version,
                            actor=Actor(user=sweep.created_by),
                        )
                except DomainError:
                    # e.g. a promotion gate on `best`: the sweep still finishes, naming its best.
                    logger.warning(
                        "sweep %s: could not point %r at %s", sweep.pk, BEST_ALIAS, version
                    )
            else:
                sweep.state = Sweep.State.FAILED
            sweep.save(update_fields=["state", "best_job", "finished_at"])
            finished += 1
    return finished
