"""The jobs panel of an organization's overview page: what runs and what waits, and why."""

from django.db.models import Count

from jobs.models import ACTIVE_STATES, Job, JobState
from jobs.selectors import queue_positions_attach
from tenants.models import Organization

OPEN_STATES = (JobState.QUEUED, *ACTIVE_STATES)


def overview_panel(*, organization: Organization, scopes: frozenset[str]) -> dict | None:
    if "jobs:read" not in scopes:
        return None
    jobs = Job.objects.for_organization(organization)
    counts = dict(
        jobs.filter(state__in=OPEN_STATES)
        .values_list("state")
        .annotate(n=Count("pk"))
        .values_list("state", "n")
    )
    # Waiting jobs in the order the scheduler takes them.
    open_jobs = list(
        jobs.filter(state__in=OPEN_STATES)
        .select_related("resource_class")
        .order_by("-state", "-priority", "created_at", "pk")[:8]
    )
    queue_positions_attach(organization=organization, jobs=open_jobs)
    return {
        "template": "jobs/_overview_panel.html",
        "running": sum(counts.get(state, 0) for state in ACTIVE_STATES),
        "queued": counts.get(JobState.QUEUED, 0),
        "open_jobs": open_jobs,
    }
