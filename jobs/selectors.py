"""Reads of jobs and the pool, for pages, the API and (later) billing reports."""

from __future__ import annotations

from collections import Counter, defaultdict
from decimal import Decimal

from django.db.models import QuerySet
from django.utils import timezone

from billing.selectors import gpu_resource, unit_price
from tenants.models import Organization

from .models import ACTIVE_STATES, Job, JobAttempt, JobState, ResourceClass, Worker


def job_list(
    *,
    organization: Organization,
    state: str | None = None,
    label: str | None = None,
    created_by: str | None = None,
) -> QuerySet[Job]:
    jobs = Job.objects.for_organization(organization).select_related(
        "resource_class",
        "created_by",
        "worker",
        "input_model_version__registered_model",
        "output_dataset_version__dataset",
        "input_dataset_version__dataset",
        "output_model_version__registered_model",
    )
    if state:
        jobs = jobs.filter(state=state)
    if label:
        # Containment, not a key path: a user's label key must never become a lookup.
        key, sep, value = label.partition("=")
        if sep:
            jobs = jobs.filter(labels__contains={key: value})
        else:
            jobs = jobs.filter(labels__has_key=key)
    if created_by:
        jobs = jobs.filter(created_by__email__icontains=created_by)
    return jobs


def job_cost_so_far(*, job: Job, now=None) -> int:
    """Billed cents for finished attempts plus the running attempt's cost so far."""
    cost = job.cost_minor
    if job.state in ACTIVE_STATES:
        attempt = JobAttempt.objects.filter(
            job=job, number=job.attempt, started_at__isnull=False
        ).first()
        if attempt is not None:
            seconds = Decimal(
                max(0.0, ((now or timezone.now()) - attempt.started_at).total_seconds())
            )
            price, _currency = unit_price(
                resource=gpu_resource(job.resource_class.name), at=attempt.started_at
            )
            cost += int(seconds * job.gpu_count * price * 100)
    return cost


def resource_classes_with_prices() -> list[tuple[ResourceClass, Decimal, str]]:
    now = timezone.now()
    return [
        (rc, *unit_price(resource=gpu_resource(rc.name), at=now))
        for rc in ResourceClass.objects.order_by("name")
    ]


def pool_overview() -> dict:
    """Per class: machines, slots busy and free; per tenant: jobs queued and GPUs held."""
    classes: dict[str, dict] = defaultdict(
        lambda: {"workers": 0, "slots": 0, "busy": 0, "schedulable_free": 0}
    )
    busy_by_worker: Counter[int] = Counter()
    held: dict[tuple[str, str], int] = Counter()
    for job in Job.objects.filter(state__in=ACTIVE_STATES, worker__isnull=False).select_related(
        "organization", "resource_class"
    ):
        busy_by_worker[job.worker_id] += len(job.slot_indices)
        held[(job.organization.name, job.resource_class.name)] += job.gpu_count
    workers = list(Worker.objects.select_related("resource_class"))
    for worker in workers:
        row = classes[worker.resource_class.name]
        row["workers"] += 1
        row["slots"] += worker.slots
        row["busy"] += busy_by_worker[worker.pk]
        if worker.status == Worker.Status.ONLINE:
            row["schedulable_free"] += worker.slots - busy_by_worker[worker.pk]
        worker.busy_slots = busy_by_worker[worker.pk]
    queued = Counter(
        Job.objects.filter(state=JobState.QUEUED).values_list(
            "organization__name", "resource_class__name"
        )
    )
    tenants = sorted(
        {key for key in queued} | {key for key in held},
    )
    return {
        "classes": dict(classes),
        "workers": workers,
        "tenants": [
            {
                "organization": o,
                "resource_class": c,
                "queued": queued[(o, c)],
                "held_gpus": held[(o, c)],
            }
            for o, c in tenants
        ],
    }
