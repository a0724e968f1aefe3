"""Writes for deployments: the deployment itself, its routes, its replicas (each a serve job),
feedback labels, datasets saved from labelled predictions, and the prediction log's retention.

Every route change is one transaction with its audit event and its timeline row; replicas of
versions no longer routed are marked draining here and stopped by the reconciler
(serving/reconciler.py), which owns the calls that place and stop serve jobs.

Deleting a deployment marks it deleted and stops it in one short transaction; its prediction
log, which may hold millions of rows, is purged after, a batch at a time (deployments_purge).
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

from celery import current_app
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from jobs.models import ResourceClass
from jobs.recipes.catalog import list_recipes
from jobs.services import replicas as replica_jobs
from registry.models import Dataset, DatasetVersion, ModelVersion
from registry.selectors import CODE_RECIPE_PREFIX, code_package_list
from registry.services import dataset_create, dataset_version_create
from tenants.actors import Actor
from tenants.errors import ConflictError, DomainError
from tenants.models import Organization
from tenants.services import audit_record

from .deletion import delete_in_batches
from .metering import prediction_charges_expire
from .models import Deployment, LoopEvent, PredictionLog, Replica, Route
from .timeline import deployment_event_publish

logger = logging.getLogger(__name__)

MAX_ROUTES = 10
# A request that found a deployment just before its deletion may still be answering (up to
# SERVING_FORWARD_TIMEOUT_S, its shadow copies after it) and then log rows that point at the
# deployment's row: the purge deletes that row only this long after the deletion.
PURGE_GRACE_S = 300
FEEDBACK_MAX_ITEMS = 1000
LABEL_MAX_BYTES = 10_000
# What a deployment's owner may change after creation (the recipe fixes the contract).
UPDATABLE = (
    "min_replicas",
    "max_replicas",
    "target_in_flight",
    "scale_to_zero_after_s",
    "log_sample_rate",
    "log_retention_days",
    "drift_column_threshold",
    "drift_share_threshold",
    "drift_window_rows",
)
ACTIVE_REPLICA_STATES = (Replica.State.STARTING, Replica.State.READY)


class DeploymentNotRouted(ConflictError):
    code = "deployment_not_routed"


def _check_sizes(*, min_replicas: int, max_replicas: int) -> None:
    if min_replicas > max_replicas:
        raise DomainError(
            "min_replicas is above max_replicas.",
            fields={"min_replicas": [f"At most max_replicas ({max_replicas})."]},
        )
    if max_replicas > settings.SERVING_MAX_REPLICAS:
        raise DomainError(
            "Too many replicas.",
            fields={"max_replicas": [f"At most {settings.SERVING_MAX_REPLICAS}."]},
        )


def _check_recipe(recipe: str, organization: Organization) -> None:
    """A recipe, or one of the organization's code packages ("code:<name>"), whose models'
    packages then serve them through their predict entry."""
    if recipe.startswith(CODE_RECIPE_PREFIX):
        name = recipe.removeprefix(CODE_RECIPE_PREFIX)
        if code_package_list(organization=organization).filter(name=name).exists():
            return
        raise DomainError(f"No code package named {name!r}.", fields={"recipe": ["Not found."]})
    if recipe not in list_recipes():
        names = ", ".join(sorted(list_recipes()))
        raise DomainError(
            "Unknown recipe.",
            fields={"recipe": [f"Choose one of {names}, or code:<package> for your own code."]},
        )


def _event(deployment: Deployment, kind: str, message: str, **fields) -> LoopEvent:
    return LoopEvent.objects.create(
        organization=deployment.organization,
        deployment=deployment,
        kind=kind,
        message=message,
        **fields,
    )


@transaction.atomic
def deployment_create(
    *,
    organization: Organization,
    name: str,
    recipe: str,
    resource_class: ResourceClass,
    actor: Actor,
    routes: list[dict] | None = None,
    **options,
) -> Deployment:
    """A new deployment; with `routes`, routed at once (see routes_set)."""
    unknown = set(options) - set(UPDATABLE)
    if unknown:
        raise TypeError(f"deployment_create got unknown options {sorted(unknown)}")
    _check_recipe(recipe, organization)
    deployment = Deployment(
        organization=organization,
        name=name,
        recipe=recipe,
        resource_class=resource_class,
        created_by=actor.user,
        **options,
    )
    _check_sizes(min_replicas=deployment.min_replicas, max_replicas=deployment.max_replicas)
    if Deployment.objects.for_organization(organization).filter(name=name).exists():
        raise ConflictError(
            f"A deployment named {name!r} already exists.", fields={"name": ["Already taken."]}
        )
    try:
        with transaction.atomic():
            deployment.save()
    except IntegrityError as exc:  # a concurrent create of the same name
        raise ConflictError(
            f"A deployment named {name!r} already exists.", fields={"name": ["Already taken."]}
        ) from exc
    audit_record(
        organization=organization,
        actor=actor,
        action="deployment.create",
        target=deployment,
        data={"recipe": recipe, "resource_class": resource_class.name},
    )
    deployment_event_publish(
        deployment=deployment,
        type="deployment.created",
        data={"recipe": recipe, "resource_class": resource_class.name},
    )
    if routes:
        routes_set(deployment=deployment, routes=routes, actor=actor)
    return deployment


@transaction.atomic
def deployment_update(*, deployment: Deployment, actor: Actor, **changes) -> Deployment:
    unknown = set(changes) - set(UPDATABLE)
    if unknown:
        raise TypeError(f"deployment_update got unknown fields {sorted(unknown)}")
    deployment = Deployment.objects.select_for_update(no_key=True).get(pk=deployment.pk)
    before = {field: getattr(deployment, field) for field in changes}
    for field, value in changes.items():
        setattr(deployment, field, value)
    _check_sizes(min_replicas=deployment.min_replicas, max_replicas=deployment.max_replicas)
    deployment.save(update_fields=list(changes) or None)
    audit_record(
        organization=deployment.organization,
        actor=actor,
        action="deployment.update",
        target=deployment,
        data={"before": before, "after": changes},
    )
    return deployment


@transaction.atomic
def deployment_delete(*, deployment: Deployment, actor: Actor) -> None:
    """Stop every replica (their in-flight requests are answered first), remove the routes, and
    mark the deployment deleted: from the commit it is gone for every reader and its name is
    free. Its prediction log, timeline and the rest are deleted by deployments_purge, asked for
    after the commit and run by beat anyway, so a broker outage only delays it."""
    deployment = Deployment.objects.select_for_update().filter(pk=deployment.pk).first()
    if deployment is None:
        return  # another request deleted it first
    replicas = Replica.objects.for_organization(deployment.organization).filter(
        deployment=deployment
    )
    for replica in replicas.exclude(state=Replica.State.STOPPED).select_related("job"):
        if not replica.job.is_terminal:
            replica_jobs.replica_job_stop(
                job=replica.job, actor=actor, reason=f"deployment {deployment.name} deleted"
            )
    audit_record(
        organization=deployment.organization,
        actor=actor,
        action="deployment.delete",
        target=deployment,
        data={"name": deployment.name},
    )
    replicas.delete()  # their jobs stay, as the record of what ran and was billed
    Route.objects.for_organization(deployment.organization).filter(deployment=deployment).delete()
    deployment.deleted_at = timezone.now()
    deployment.save(update_fields=["deleted_at"])
    transaction.on_commit(deployments_purge_soon)


def deployments_purge_soon() -> None:
    """Best effort: the deletion is committed with its mark, which beat's purge finds every
    SERVING_PURGE_EVERY_S, so a broker blip here only delays the purge, never loses it."""
    try:
        current_app.send_task("serving.deployments_purge", retry=False)
    except Exception:
        logger.warning("a deleted deployment's log waits for the periodic purge", exc_info=True)


def deployments_purge(
    *, now: datetime | None = None, budget_s: float | None = None, batch: int | None = None
) -> int:
    """Delete the prediction logs of deleted deployments, oldest deletion first, a batch of
    SERVING_RETENTION_BATCH rows at a time (each its own short transaction, as retention does,
    so no delete holds a long lock); then, PURGE_GRACE_S after its deletion, each deployment's
    row with what else it held (timeline, drift reports, retrains, and any log row written
    since). Stops between batches once `budget_s` (SERVING_PURGE_BUDGET_S) is spent; the next
    run goes on from there. Returns how many log rows it deleted. Two runs at once only race to
    delete the same rows, which the second finds gone."""
    now = now or timezone.now()
    budget_s = settings.SERVING_PURGE_BUDGET_S if budget_s is None else budget_s
    batch = batch or settings.SERVING_RETENTION_BATCH
    deadline = time.monotonic() + budget_s
    deleted = 0
    marked = (
        Deployment.all_objects.filter(deleted_at__isnull=False)
        .order_by("deleted_at", "pk")
        .values_list("pk", "deleted_at")
    )
    for deployment_id, deleted_at in marked:
        removed, done = delete_in_batches(
            PredictionLog.objects.filter(deployment_id=deployment_id),
            batch=batch,
            deadline=deadline,
        )
        deleted += removed
        if not done:
            return deleted
        if now - deleted_at >= timedelta(seconds=PURGE_GRACE_S):
            _deleted_deployment_remove(deployment_id)
    return deleted


@transaction.atomic
def _deleted_deployment_remove(deployment_id: int) -> None:
    deployment = (
        Deployment.all_objects.select_for_update()
        .filter(pk=deployment_id, deleted_at__isnull=False)
        .first()
    )
    if deployment is not None:
        deployment.delete()
        logger.info("deleted deployment %s purged", deployment_id)


def _route_error(index: int, message: str) -> DomainError:
    return DomainError(f"Route {index + 1}: {message}", fields={"routes": [message]})


def _weight(index: int, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _route_error(index, "weight must be a whole number from 0 to 100.")
    if not 0 <= value <= 100:
        raise _route_error(index, f"weight {value} is outside 0..100.")
    return value


def _versions_of(organization: Organization, refs: list) -> dict[int, ModelVersion]:
    """The organization's versions among `refs` (ids or versions); another tenant's id or version
    is simply not found, exactly like one that does not exist."""
    ids = [ref.pk if isinstance(ref, ModelVersion) else ref for ref in refs]
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise DomainError(
            "A route names its model version by id.",
            fields={"routes": ["model_version must be a model version id."]},
        )
    return ModelVersion.objects.for_organization(organization).in_bulk(ids)


def _validated_routes(deployment: Deployment, routes: list[dict]) -> list[dict]:
    if not isinstance(routes, list) or not routes:
        raise DomainError("A deployment needs at least one route.", fields={"routes": ["Empty."]})
    if len(routes) > MAX_ROUTES:
        raise DomainError(
            "Too many routes.", fields={"routes": [f"At most {MAX_ROUTES} model versions."]}
        )
    if not all(isinstance(r, dict) and "model_version" in r for r in routes):
        raise DomainError(
            "Each route names a model_version.",
            fields={"routes": ['Each item is {"model_version", "weight", "mode"}.']},
        )
    versions = _versions_of(deployment.organization, [r["model_version"] for r in routes])
    clean, seen = [], set()
    for index, route in enumerate(routes):
        ref = route["model_version"]
        version = versions.get(ref.pk if isinstance(ref, ModelVersion) else ref)
        if version is None:
            raise _route_error(index, f"no model version {ref} in this organization.")
        if version.pk in seen:
            raise _route_error(index, f"{version} is routed twice; give it one route.")
        seen.add(version.pk)
        if version.recipe_name != deployment.recipe:
            raise _route_error(
                index,
                f"{version} was made by {version.recipe_name or 'no recipe'}; this deployment "
                f"serves {deployment.recipe}.",
            )
        mode = route.get("mode", Route.Mode.LIVE)
        if mode not in Route.Mode.values:
            raise _route_error(index, f"mode must be one of {', '.join(Route.Mode.values)}.")
        stage = route.get("stage", Route.Stage.STABLE)
        if stage not in Route.Stage.values:
            raise _route_error(index, f"stage must be one of {', '.join(Route.Stage.values)}.")
        weight = _weight(index, route.get("weight"))
        if mode == Route.Mode.LIVE and weight == 0:
            raise _route_error(index, "a live route needs a weight above 0; remove it instead.")
        clean.append({"model_version": version, "weight": weight, "mode": mode, "stage": stage})
    live = [r["weight"] for r in clean if r["mode"] == Route.Mode.LIVE]
    if not live:
        raise DomainError(
            "At least one route must be live.", fields={"routes": ["Add a live route."]}
        )
    if sum(live) != 100:
        raise DomainError(
            f"Live weights add up to {sum(live)}, not 100.",
            fields={"routes": ["Live weights must add up to exactly 100."]},
        )
    return clean


def _describe(routes) -> list[dict]:
    return [
        {
            "model_version": r.model_version_id,
            "version": str(r.model_version),
            "weight": r.weight,
            "mode": r.mode,
            "stage": r.stage,
        }
        for r in routes
    ]


@transaction.atomic
def routes_set(
    *,
    deployment: Deployment,
    routes: list[dict],
    actor: Actor,
    event_kind: str | None = LoopEvent.Kind.DEPLOYED,
    message: str = "",
    event_data: dict | None = None,
) -> list[Route]:
    """Replace a deployment's routes with `routes`: [{"model_version": ModelVersion or id,
    "weight": 0..100, "mode": "live"|"shadow", "stage": "stable"|"canary"}], live weights summing
    to exactly 100, every version the organization's and trained by the deployment's recipe.

    One transaction: the routes, the audit event (with `event_data`), and one timeline row of
    `event_kind`, or none when the caller writes its own (the loop's rollout records each of its
    steps). Replicas of versions no longer routed are marked draining; the reconciler stops them.
    """
    deployment = Deployment.objects.select_for_update(no_key=True).get(pk=deployment.pk)
    clean = _validated_routes(deployment, routes)
    org = deployment.organization
    current = Route.objects.for_organization(org).filter(deployment=deployment)
    before = _describe(current.select_related("model_version__registered_model"))
    current.delete()
    made = Route.objects.bulk_create(
        [Route(organization=org, deployment=deployment, **route) for route in clean]
    )
    routed = [r["model_version"].pk for r in clean]
    now = timezone.now()
    drained = (
        Replica.objects.for_organization(org)
        .filter(deployment=deployment, state__in=ACTIVE_REPLICA_STATES)
        .exclude(model_version_id__in=routed)
        .update(state=Replica.State.DRAINING)
    )
    after = _describe(made)
    audit_record(
        organization=org,
        actor=actor,
        action="deployment.routes_set",
        target=deployment,
        data={"before": before, "after": after} | (event_data or {}),
    )
    if event_kind is None:
        return made
    _event(
        deployment,
        event_kind,
        message or ", ".join(f"{r['version']} {r['mode']} {r['weight']}%" for r in after),
        data={"routes": after, "previous": before, "replicas_draining": drained}
        | (event_data or {}),
        model_version=clean[0]["model_version"],
        created_at=now,
    )
    return made


def _label_size_ok(label) -> bool:
    try:
        return len(json.dumps(label)) <= LABEL_MAX_BYTES
    except (TypeError, ValueError):
        return False


def feedback_record(*, deployment: Deployment, items: list[dict], actor: Actor) -> dict:
    """Attach ground-truth labels to this deployment's logged predictions.

    A prediction id that is not one of this deployment's logged predictions (another tenant's,
    another deployment's, sampled out of the log, expired, or made up) is counted as unknown and
    never written. Sending the same labels again changes nothing; a new label replaces the old.
    """
    if not isinstance(items, list) or not items:
        raise DomainError("No feedback items.", fields={"items": ["A non-empty list."]})
    if len(items) > FEEDBACK_MAX_ITEMS:
        raise DomainError(
            "Too many feedback items.", fields={"items": [f"At most {FEEDBACK_MAX_ITEMS}."]}
        )
    labels: dict[uuid.UUID, object] = {}
    unknown = 0
    for item in items:
        if not isinstance(item, dict) or "prediction_id" not in item or "label" not in item:
            raise DomainError(
                "Each feedback item is {prediction_id, label}.",
                fields={"items": ['Each item is {"prediction_id": ..., "label": ...}.']},
            )
        if item["label"] is None or not _label_size_ok(item["label"]):
            raise DomainError(
                "A label must be a JSON value (not null) of at most 10,000 bytes.",
                fields={"items": [f"Bad label for {str(item['prediction_id'])[:64]}."]},
            )
        try:
            labels[uuid.UUID(str(item["prediction_id"]))] = item["label"]
        except ValueError:
            unknown += 1
    now = timezone.now()
    with transaction.atomic():
        rows = list(
            PredictionLog.objects.for_organization(deployment.organization)
            .filter(deployment=deployment, prediction_id__in=list(labels))
            .select_for_update()
        )
        changed = [row for row in rows if row.label != labels[row.prediction_id]]
        for row in changed:
            row.label, row.labelled_at = labels[row.prediction_id], now
        PredictionLog.objects.bulk_update(changed, ["label", "labelled_at"])
    return {
        "labelled": len(changed),
        "unchanged": len(rows) - len(changed),
        "unknown": unknown + len(labels) - len(rows),
    }


def _dataset_for(
    *, organization: Organization, name: str, deployment: Deployment, actor: Actor
) -> Dataset:
    dataset = Dataset.objects.for_organization(organization).filter(name=name).first()
    if dataset is not None:
        return dataset
    return dataset_create(
        organization=organization,
        name=name,
        description=f"Labelled predictions of deployment {deployment.name}.",
        actor=actor,
    )


def _write_csv(path: Path, rows: list[tuple], target: str) -> None:
    """One column per input key (dict inputs, e.g. tabular rows), else one `input` column with
    the input as JSON; then the label under `target`."""
    keys = sorted({k for inputs, _label in rows if isinstance(inputs, dict) for k in inputs})
    if target in keys:
        raise DomainError(
            f"The inputs already have a column {target!r}.",
            fields={"target": ["Choose another name for the label column."]},
        )
    columns = keys or ["input"]
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow([*columns, target])
        for inputs, label in rows:
            if keys:
                values = [inputs.get(k, "") if isinstance(inputs, dict) else "" for k in keys]
            else:
                values = [inputs if isinstance(inputs, str) else json.dumps(inputs)]
            writer.writerow(
                [*values, label if isinstance(label, str | int | float) else json.dumps(label)]
            )


def feedback_dataset_save(
    *,
    deployment: Deployment,
    since: datetime,
    until: datetime,
    dataset_name: str,
    actor: Actor,
    target: str = "label",
) -> DatasetVersion:
    """Save the deployment's labelled live predictions made in [since, until) as a new version
    of `dataset_name` (created if missing): a CSV of the inputs and the label under `target`.
    Its lineage: derived from the model version that made the rows when it is one version, and
    the audit event names the deployment and window."""
    if until <= since:
        raise DomainError("The window is empty.", fields={"until": ["After since."]})
    org = deployment.organization
    rows = (
        PredictionLog.objects.for_organization(org)
        .filter(
            deployment=deployment,
            mode=Route.Mode.LIVE,
            created_at__gte=since,
            created_at__lt=until,
            label__isnull=False,
        )
        .order_by("created_at", "pk")
    )
    limit = settings.SERVING_DATASET_MAX_ROWS
    picked = list(rows.values_list("inputs", "label", "model_version_id")[: limit + 1])
    if not picked:
        raise DomainError(
            "No labelled predictions in that window.",
            fields={"since": ["Send feedback first, or widen the window."]},
        )
    if len(picked) > limit:
        raise DomainError(
            f"Over {limit:,} labelled predictions in that window.",
            fields={"until": ["Narrow the window."]},
        )
    versions = {version_id for _i, _l, version_id in picked}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{deployment.name}-feedback.csv"
        _write_csv(path, [(inputs, label) for inputs, label, _v in picked], target)
        dataset = _dataset_for(
            organization=org, name=dataset_name, deployment=deployment, actor=actor
        )
        version = dataset_version_create(
            dataset=dataset,
            path=path,
            filename=path.name,
            actor=actor,
            declared_format="csv",
            derived_from_model_version=(
                ModelVersion.objects.for_organization(deployment.organization).get(
                    pk=next(iter(versions))
                )
                if len(versions) == 1
                else None
            ),
        )
    audit_record(
        organization=org,
        actor=actor,
        action="deployment.feedback_saved",
        target=deployment,
        data={
            "dataset_version": version.pk,
            "dataset": dataset.name,
            "number": version.number,
            "rows": len(picked),
            "since": since.isoformat(),
            "until": until.isoformat(),
            "model_versions": sorted(versions),
        },
    )
    return version


def prediction_log_expire(*, now: datetime | None = None, batch: int | None = None) -> int:
    """Delete logged predictions older than their deployment's retention, and billed prediction
    charges past the idempotency window, a batch at a time (each its own short transaction, so a
    large backlog never holds one long lock); returns how many rows."""
    now = now or timezone.now()
    batch = batch or settings.SERVING_RETENTION_BATCH
    deleted = 0
    for deployment_id, days in Deployment.objects.values_list("pk", "log_retention_days"):
        cutoff = now - timedelta(days=days)
        rows = PredictionLog.objects.filter(deployment_id=deployment_id, created_at__lt=cutoff)
        deleted += delete_in_batches(rows, batch=batch)[0]
    return deleted + prediction_charges_expire(now=now, batch=batch)
