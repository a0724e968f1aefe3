"""Submitting, cancelling and retrying jobs: what a tenant asks of the pool."""

from __future__ import annotations

import re
from decimal import Decimal

from django.db import IntegrityError, transaction
from django.db.models import Max
from django.utils import timezone

from billing.selectors import gpu_resource, unit_price
from jobs.models import Job, JobAttempt, JobState, ResourceClass, Worker
from jobs.recipes.base import validate_parameters
from jobs.recipes.catalog import get_recipe
from registry.models import DatasetVersion, ModelVersion
from registry.services.datasets import validate_name
from tenants.actors import Actor
from tenants.errors import ConflictError, DomainError
from tenants.models import Organization
from tenants.services import audit_record

from .attempts import attempt_close, checkpoint_forget
from .events import job_event
from .quotas import quota_ensure
from .ticks import tick_soon


class QuotaExceeded(ConflictError):
    code = "quota_exceeded"


MAX_RUNTIME_S = 7 * 24 * 3600
MAX_LABELS = 20
# A letter first, so a key is never read as a JSON array index (reports group by label keys).
LABEL_KEY = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,62}")


def cost_rate_per_hour(*, resource_class: ResourceClass, gpu_count: int) -> tuple[Decimal, str]:
    price, currency = unit_price(resource=gpu_resource(resource_class.name), at=timezone.now())
    return price * gpu_count * 3600, currency


def _validate_labels(labels: dict) -> dict:
    if not isinstance(labels, dict) or len(labels) > MAX_LABELS:
        raise DomainError(
            "Labels are up to 20 key/value strings.", fields={"labels": ["Up to 20 string pairs."]}
        )
    for key, value in labels.items():
        if not (
            isinstance(key, str)
            and isinstance(value, str)
            and LABEL_KEY.fullmatch(key)
            and len(value) <= 200
        ):
            raise DomainError(
                f"Label {key!r} is not a short string pair.",
                fields={
                    "labels": [
                        "Keys: 1-63 letters, digits, '.', '_' or '-', starting with a letter; "
                        "values up to 200 characters."
                    ]
                },
            )
    return labels


def job_submit(
    *,
    organization: Organization,
    actor: Actor,
    resource_class: ResourceClass,
    recipe: str = "",
    parameters: dict | None = None,
    gpu_count: int = 1,
    priority: int = 0,
    labels: dict | None = None,
    max_runtime_s: int = 3600,
    dataset_version: DatasetVersion | None = None,
    model_version: ModelVersion | None = None,
    output_model_name: str = "",
    output_dataset_name: str = "",
    kind: str = Job.Kind.TRAIN,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Queue a job; returns (job, created). A repeated idempotency key returns the first job."""
    if idempotency_key and len(idempotency_key) > 200:
        raise DomainError(
            "The Idempotency-Key is longer than 200 characters.",
            fields={"idempotency_key": ["At most 200 characters, e.g. a UUID."]},
        )
    if idempotency_key:
        existing = (
            Job.objects.for_organization(organization)
            .filter(idempotency_key=idempotency_key)
            .first()
        )
        if existing is not None:
            return existing, False
    for linked in (dataset_version, model_version):
        if linked is not None and linked.organization_id != organization.pk:
            raise DomainError("Inputs must be this organization's own versions.")
    if dataset_version is None:
        raise DomainError(
            "A job needs an input dataset version.", fields={"dataset": ["Required."]}
        )
    if kind == Job.Kind.INFER:
        if model_version is None:
            raise DomainError(
                "Batch inference needs a model version.", fields={"model": ["Required."]}
            )
        if not model_version.recipe_name:
            raise DomainError(
                f"{model_version} was not trained by a recipe, so no recipe can run it.",
                fields={"model": ["Choose a version trained on the platform."]},
            )
        recipe = model_version.recipe_name
        recipe_cls = get_recipe(recipe)
        parameters = validate_parameters(recipe_cls, parameters or {}, task="predict")
    else:
        recipe_cls = get_recipe(recipe)
        parameters = validate_parameters(recipe_cls, parameters or {})
        if model_version is not None and model_version.recipe_name != recipe:
            raise DomainError(
                f"{model_version} was trained by {model_version.recipe_name or 'no recipe'}; "
                f"continue training it with that recipe, not {recipe}.",
                fields={"model": ["Must come from the same recipe."]},
            )
    if dataset_version.format not in recipe_cls.dataset_formats:
        raise DomainError(
            f"{recipe} reads {', '.join(recipe_cls.dataset_formats)}; "
            f"this dataset version is {dataset_version.format}.",
            fields={"dataset": [f"Choose a {' or '.join(recipe_cls.dataset_formats)} dataset."]},
        )
    if not 1 <= gpu_count <= 64:
        raise DomainError("Ask for 1 to 64 GPUs.", fields={"gpu_count": ["Between 1 and 64."]})
    if gpu_count > 1 and kind == Job.Kind.TRAIN and not recipe_cls.distributed:
        raise DomainError(
            f"{recipe} trains on one GPU; ask for 1.",
            fields={"gpu_count": ["This recipe does not train data-parallel."]},
        )
    largest = Worker.objects.filter(resource_class=resource_class).aggregate(m=Max("slots"))["m"]
    if largest is not None and gpu_count > largest:
        raise DomainError(
            f"No {resource_class} machine has {gpu_count} GPUs (the largest has {largest}).",
            fields={"gpu_count": [f"At most {largest} on {resource_class}."]},
        )
    if not 60 <= max_runtime_s <= MAX_RUNTIME_S:
        raise DomainError(
            "Max runtime is 1 minute to 7 days.",
            fields={"max_runtime_s": ["60 to 604800 seconds."]},
        )
    if kind == Job.Kind.INFER:
        output_model_name = ""
        output_dataset_name = validate_name(
            output_dataset_name or f"{model_version.registered_model.name}-predictions",
            field="output_dataset",
        )
    else:
        default_model = (
            model_version.registered_model.name
            if model_version is not None
            else f"{recipe}-{dataset_version.dataset.name}"
        )
        output_model_name = validate_name(output_model_name or default_model, field="output_model")
        output_dataset_name = ""
    labels = _validate_labels(labels or {})

    try:
        with transaction.atomic():
            # Locking the quota row serialises concurrent submits of one organization and class,
            # so the queued-jobs cap holds under races.
            quota = quota_ensure(organization=organization, resource_class=resource_class)
            quota = type(quota).objects.select_for_update().get(pk=quota.pk)
            if gpu_count > quota.limit_gpus:
                raise QuotaExceeded(
                    f"The job asks for {gpu_count} {resource_class} GPUs; "
                    f"your quota allows {quota.limit_gpus}.",
                    fields={"gpu_count": [f"At most {quota.limit_gpus}."]},
                )
            queued = (
                Job.objects.for_organization(organization)
                .filter(resource_class=resource_class, state=JobState.QUEUED)
                .count()
            )
            if queued >= quota.max_queued_jobs:
                raise QuotaExceeded(
                    f"{queued} jobs are already queued on {resource_class}, the most your quota "
                    "allows; wait for some to start or cancel some."
                )
            job = Job.objects.create(
                organization=organization,
                kind=kind,
                recipe=recipe,
                recipe_version=recipe_cls.version,
                parameters=parameters,
                input_dataset_version=dataset_version,
                input_model_version=model_version,
                output_model_name=output_model_name,
                output_dataset_name=output_dataset_name,
                resource_class=resource_class,
                gpu_count=gpu_count,
                priority=priority,
                labels=labels,
                max_runtime_s=max_runtime_s,
                created_by=actor.api_key.created_by if actor.api_key else actor.user,
                created_by_api_key=actor.api_key,
                idempotency_key=idempotency_key or None,
                waiting_reason="waiting for the scheduler",
            )
            job_event(
                job=job, kind="submitted", message=f"Queued for {gpu_count}x {resource_class}."
            )
            audit_record(
                organization=organization,
                actor=actor,
                action="job.submit",
                target=job,
                data={
                    "kind": kind,
                    "recipe": recipe,
                    "gpus": gpu_count,
                    "resource_class": resource_class.name,
                },
            )
            transaction.on_commit(tick_soon)
    except IntegrityError:
        # The same idempotency key raced another submit; the winner's job is the answer.
        if not idempotency_key:
            raise
        existing = (
            Job.objects.for_organization(organization)
            .filter(idempotency_key=idempotency_key)
            .first()
        )
        if existing is None:
            raise
        return existing, False
    return job, True


@transaction.atomic
def job_cancel(*, job: Job, actor: Actor) -> Job:
    job = Job.objects.select_for_update().get(pk=job.pk)
    if job.is_terminal or job.state == JobState.CANCELLING:
        raise ConflictError(f"The job is already {job.state}.")
    if job.state in (JobState.QUEUED, JobState.SCHEDULED):
        # Not started: a scheduled run message finds the job cancelled when it claims it.
        job.transition_to(JobState.CANCELLED)
        job.finished_at = timezone.now()
        job.waiting_reason, job.queue_position = "", None
        attempt_close(job=job, outcome=JobAttempt.Outcome.CANCELLED)
        checkpoint_forget(job=job)
        job.worker, job.slot_indices, job.lease_expires_at = None, [], None
    else:
        job.transition_to(JobState.CANCELLING)
    job.save()
    job_event(job=job, kind="cancel_requested", message=f"Cancelled by {actor.label}.")
    audit_record(organization=job.organization, actor=actor, action="job.cancel", target=job)
    transaction.on_commit(tick_soon)
    return job


def job_retry(*, job: Job, actor: Actor) -> Job:
    """Submit a failed or cancelled job again, as a new job that points at the old one."""
    if job.state not in (JobState.FAILED, JobState.CANCELLED):
        raise ConflictError(
            f"Only failed or cancelled jobs can be retried; this one is {job.state}."
        )
    retried, _ = job_submit(
        organization=job.organization,
        actor=actor,
        recipe=job.recipe,
        parameters=job.parameters,
        resource_class=job.resource_class,
        gpu_count=job.gpu_count,
        priority=job.priority,
        labels=job.labels,
        max_runtime_s=job.max_runtime_s,
        dataset_version=job.input_dataset_version,
        model_version=job.input_model_version,
        output_model_name=job.output_model_name,
        output_dataset_name=job.output_dataset_name,
        kind=job.kind,
    )
    Job.objects.filter(pk=retried.pk).update(retry_of=job)
    retried.retry_of = job
    return retried
