"""The job timeline."""

from jobs.models import Job, JobEvent


def job_event(*, job: Job, kind: str, message: str = "", data: dict | None = None) -> JobEvent:
    return JobEvent.objects.create(
        organization_id=job.organization_id,
        job=job,
        attempt=job.attempt,
        kind=kind,
        message=message,
        data=data or {},
    )
