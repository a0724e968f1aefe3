"""The job timeline, and the webhook event owed when a job ends."""

from jobs.models import Job, JobEvent, JobState
from webhooks.services import event_publish

_ENDED_EVENTS = {
    JobState.SUCCEEDED: "job.succeeded",
    JobState.FAILED: "job.failed",
    JobState.CANCELLED: "job.cancelled",
}


def job_event(*, job: Job, kind: str, message: str = "", data: dict | None = None) -> JobEvent:
    return JobEvent.objects.create(
        organization_id=job.organization_id,
        job=job,
        attempt=job.attempt,
        kind=kind,
        message=message,
        data=data or {},
    )


def job_ended_publish(*, job: Job) -> None:
    """Owe `job.succeeded` / `job.failed` / `job.cancelled` to the organization's webhooks, in
    the transaction that ends the job. Every path to a terminal state calls it (a runner's
    finish, a lost lease's last try, a cancel before start). A deployment's replicas are left
    out: the serving loop starts and stops them, and their deployment has events of its own."""
    if job.kind == Job.Kind.SERVE or job.state not in _ENDED_EVENTS:
        return
    data = {
        "id": job.pk,
        "kind": job.kind,
        "recipe": job.recipe,
        "state": job.state,
        "labels": job.labels,
        "attempt": job.attempt,
        "created_at": job.created_at.isoformat(),
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "output_model_version_id": job.output_model_version_id,
        "output_dataset_version_id": job.output_dataset_version_id,
        "sweep_id": job.sweep_id,
    }
    if job.state == JobState.FAILED:
        data["failure_reason"] = job.failure_reason[:1000]
    event_publish(organization=job.organization, type=_ENDED_EVENTS[job.state], data={"job": data})
