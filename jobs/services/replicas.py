"""Serve jobs: the long-running replicas a deployment asks for (serving/ decides how many and of
which model version; jobs places, runs, bills and stops them like any job).

The replica's HTTP contract (the web is its only client):
- `POST http://{address}/predict` with `Authorization: Bearer {replica_token(job.pk, attempt)}`
  and JSON `{"inputs": [...]}` (at most ONLINE_PREDICTION_MAX_ROWS items) -> 200
  `{"outputs": [...]}`, one per input in order; 400 `{"detail": "..."}` for inputs the model cannot
  read (safe to show the tenant); 401 without the right token.
- `GET http://{address}/healthz` -> 200 `{"status": "ready", "in_flight": n}`.
- On stop: no new requests, the in-flight ones are answered, then the process exits.

Outputs per recipe: classifiers `{"label": str, "probabilities": {label: p}}`; the forecaster
`{"forecast": [float, ...]}`. Feedback labels: the class (classifiers), the actual values
(forecaster).

Inputs per recipe (each recipe's `online_predictor`): tabular-classifier a row `{column: value}`
(numbers, text, true/false or null as its input signature says; other keys ignored);
image-classifier `{"image": "<base64 of a PNG, JPEG, GIF, BMP or WebP file>"}`; text-classifier
`{"text": "..."}`; timeseries-forecaster `{"history": [value, ...], "series": "name"}`, the
series' latest values in time order (at least the model's window; `series` optional). A body
over SERVE_MAX_BODY_BYTES or with more inputs than ONLINE_PREDICTION_MAX_ROWS is a 413, a body
that is not `{"inputs": [...]}` in plain JSON (no NaN) a 400; a model's own failure is a 500
whose detail shows no code.
"""

from __future__ import annotations

import hashlib
import hmac

from django.conf import settings
from django.db import transaction

from jobs.recipes.base import CONFIG_FILENAME, WEIGHTS_FILENAME
from jobs.recipes.catalog import get_recipe
from registry.models import ModelVersion
from tenants.actors import Actor
from tenants.errors import ConflictError, DomainError
from tenants.models import Organization
from tenants.services import audit_record
from tenants.standing import Effect, standing_check

from ..models import Job, JobState, ResourceClass
from .events import job_event
from .submission import JobOptions, JobSpec, job_admit, job_stop_request, predicting_package
from .ticks import tick_soon


def replica_token(job_id: int, attempt: int) -> str:
    """The bearer token of one attempt of a serve job: derived, never stored, so the web and the
    worker agree on it and it dies with the attempt. The replica's child receives only this."""
    message = f"replica:{job_id}:{attempt}".encode()
    return hmac.new(settings.SECRET_KEY.encode(), message, hashlib.sha256).hexdigest()


def replica_spec(*, organization: Organization, model_version: ModelVersion) -> JobSpec:
    """A serve job: a version of this organization, trained by a recipe that serves online or
    by a code package with a predict entry (which then serves it in the sandbox), with the
    weights and config its recipe or package loads."""
    if model_version is None or model_version.organization_id != organization.pk:
        # The same words as for a version that does not exist: nothing of another tenant shows.
        raise DomainError(
            "A replica serves a model version of this organization.",
            fields={"model_version": ["Not found."]},
        )
    if not model_version.recipe_name:
        raise DomainError(
            f"{model_version} was not trained by a recipe, so no replica can serve it.",
            fields={"model_version": ["Choose a version trained on the platform."]},
        )
    package = predicting_package(model_version, field="model_version")
    recipe_cls = get_recipe(model_version.recipe_name) if package is None else None
    if recipe_cls is not None and not recipe_cls.online:
        raise DomainError(
            f"Models of {recipe_cls.name} do not serve online; use batch inference jobs.",
            fields={"model_version": [f"{recipe_cls.name} has no online predictor."]},
        )
    names = set(model_version.artifacts.values_list("name", flat=True))
    if not {WEIGHTS_FILENAME, CONFIG_FILENAME} <= names:
        raise DomainError(
            f"{model_version} has no {WEIGHTS_FILENAME} and {CONFIG_FILENAME} to serve.",
            fields={"model_version": ["Its files are incomplete."]},
        )
    return JobSpec(
        kind=Job.Kind.SERVE,
        recipe=recipe_cls,
        parameters={},
        dataset_version=None,
        model_version=model_version,
        code_package_version=package,
    )


def replica_job_submit(
    *,
    organization: Organization,
    model_version: ModelVersion,
    resource_class: ResourceClass,
    actor: Actor,
    labels: dict | None = None,
) -> Job:
    """Queue a serve job for `model_version` (of `organization`), admitted like any job: the
    organization's standing (a budget reached stops new spending), its quota and queued cap under
    the quota's lock, the job row with its event and audit record. One slot, no maximum runtime:
    it serves until `replica_job_stop`."""
    standing_check(organization=organization, effect=Effect.SPEND)
    spec = replica_spec(organization=organization, model_version=model_version)
    job, _created = job_admit(
        organization=organization,
        actor=actor,
        spec=spec,
        options=JobOptions(
            resource_class=resource_class, gpu_count=1, max_runtime_s=0, labels=labels or {}
        ),
    )
    return job


@transaction.atomic
def replica_job_stop(*, job: Job, actor: Actor, reason: str) -> Job:
    """Drain and stop a serve job: its in-flight requests are answered first.

    The job leaves the routable set at once (CANCELLING is not RUNNING); its runner sends the
    server SIGTERM, which stops accepting, answers what is in flight (SERVE_DRAIN_S at most) and
    exits; the attempt then ends cancelled, billed to that moment, its address cleared. A
    replica not started yet is cancelled at once. Stopping one already stopping or ended is a
    no-op, so a deployment's reconciler may repeat itself.
    """
    job = Job.objects.select_for_update().get(pk=job.pk)
    if job.kind != Job.Kind.SERVE:
        raise ConflictError(f"Job {job.pk} is not a replica; cancel it instead.")
    if job.is_terminal or job.state == JobState.CANCELLING:
        return job
    job_stop_request(job)
    job.save()
    job_event(job=job, kind="stop_requested", message=f"Stopped by {actor.label}: {reason}"[:500])
    audit_record(
        organization=job.organization,
        actor=actor,
        action="replica.stop",
        target=job,
        data={"reason": reason[:200]},
    )
    transaction.on_commit(tick_soon)
    return job
