"""The pool's machines: registration, heartbeats, operator states, and recovery from silence."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from jobs.models import ACTIVE_STATES, Job, JobAttempt, JobState, ResourceClass, Worker
from jobs.runtimes import RuntimeReport

from .attempts import (
    attempt_bill,
    attempt_close,
    attempt_release,
    checkpoint_forget,
    job_resume_words,
)
from .events import job_ended_publish, job_event
from .runtimes import worker_runtimes_record
from .ticks import tick_soon

logger = logging.getLogger(__name__)

CPU_CLASS = "cpu"


def resource_class_for_devices(devices: list[dict]) -> ResourceClass:
    """The class whose name patterns match the GPUs torch sees; `cpu` when there are none."""
    if not devices:
        return ResourceClass.objects.get_or_create(
            name=CPU_CLASS, defaults={"display_name": "CPU"}
        )[0]
    name = devices[0]["name"]
    for resource_class in ResourceClass.objects.exclude(name=CPU_CLASS):
        if any(pattern.lower() in name.lower() for pattern in resource_class.device_name_patterns):
            return resource_class
    raise ValueError(
        f"No resource class matches the GPU {name!r}; add its name to a class's device name "
        "patterns in the admin, then start the worker again."
    )


@transaction.atomic
def worker_register(
    *,
    name: str,
    devices: list[dict],
    hostname: str = "",
    version: str = "",
    runtimes: Sequence[RuntimeReport] = (),
) -> Worker:
    """Record the machine as it starts: its slots, and the runtimes it probed (working or not)."""
    resource_class = resource_class_for_devices(devices)
    slots = len(devices) or settings.WORKER_CPU_SLOTS
    worker, created = Worker.objects.select_for_update().get_or_create(
        name=name,
        defaults={"resource_class": resource_class, "slots": slots, "queue": f"worker.{name}"},
    )
    worker.resource_class, worker.slots, worker.devices = resource_class, slots, devices
    worker.hostname, worker.software_version = hostname, version
    worker.last_heartbeat_at = timezone.now()
    # A machine that restarts under the same name runs none of the jobs it had: end their leases
    # so the next tick requeues them to resume from their checkpoints.
    Job.objects.filter(worker=worker, state__in=ACTIVE_STATES).update(
        lease_expires_at=timezone.now()
    )
    if worker.status == Worker.Status.OFFLINE:
        worker.status = Worker.Status.ONLINE
    worker.save()
    worker_runtimes_record(worker=worker, reports=runtimes, now=worker.last_heartbeat_at)
    logger.info(
        "worker %s %s with %d %s slots",
        name,
        "registered" if created else "re-registered",
        slots,
        resource_class,
    )
    transaction.on_commit(tick_soon)
    return worker


def worker_heartbeat(*, worker_id: int) -> None:
    """Prove the machine is alive. Job leases are extended by each attempt's own reports, so a
    job whose runner died on a live machine still times out."""
    now = timezone.now()
    Worker.objects.filter(pk=worker_id).update(last_heartbeat_at=now)
    Worker.objects.filter(pk=worker_id, status=Worker.Status.OFFLINE).update(
        status=Worker.Status.ONLINE
    )


@transaction.atomic
def worker_set_status(*, worker: Worker, status: str) -> Worker:
    """Operators cordon (place nothing new), drain (let running jobs finish) or uncordon."""
    if status not in (Worker.Status.ONLINE, Worker.Status.CORDONED, Worker.Status.DRAINING):
        raise ValueError(f"unknown worker status {status!r}")
    worker = Worker.objects.select_for_update().get(pk=worker.pk)
    worker.status = status
    worker.save(update_fields=["status"])
    logger.info("worker %s is now %s", worker.name, status)
    transaction.on_commit(tick_soon)
    return worker


def reap_lost(*, now=None) -> int:
    """Mark silent workers offline and take back their jobs' expired leases (inside the tick)."""
    now = now or timezone.now()
    silence = timedelta(seconds=settings.WORKER_OFFLINE_AFTER_S)
    Worker.objects.filter(last_heartbeat_at__lt=now - silence).exclude(
        status=Worker.Status.OFFLINE
    ).update(status=Worker.Status.OFFLINE)
    expired = (
        Job.objects.select_for_update(skip_locked=True, of=("self",))
        .select_related("resource_class", "worker", "organization")
        .filter(
            state__in=[
                JobState.SCHEDULED,
                JobState.RUNNING,
                JobState.PREEMPTED,
                JobState.CANCELLING,
            ]
        )
        .filter(lease_expires_at__lt=now)
    )
    count = 0
    for job in expired:
        count += 1
        worker_name = job.worker.name if job.worker else "its worker"
        # The worker's last sign of life was one lease length before the lease ran out.
        record = attempt_close(
            job=job, outcome=JobAttempt.Outcome.LOST, ended_at=job.lease_expires_at - silence
        )
        if record is not None:
            attempt_bill(job=job, attempt=record)
        attempt_release(job)
        if job.state == JobState.CANCELLING:
            job.transition_to(JobState.CANCELLED)
            job.finished_at = now
        else:
            # A job whose run message never arrived did not run: that loss is not the job's.
            if job.state != JobState.SCHEDULED:
                job.lost_attempts += 1
            if job.lost_attempts >= settings.JOB_MAX_LOST_ATTEMPTS:
                job.transition_to(JobState.FAILED)
                job.finished_at = now
                job.failure_reason = (
                    f"Failed after {job.lost_attempts} attempts: "
                    f"{worker_name} stopped responding each time."
                )
            else:
                job.transition_to(JobState.QUEUED)
                job.waiting_reason = (
                    f"{worker_name} stopped responding; waiting to {job_resume_words(job)}"
                )
        if job.is_terminal:
            checkpoint_forget(job=job)
        job.save()
        job_event(
            job=job,
            kind="lost",
            message=f"Attempt {job.attempt} lost: {worker_name} stopped responding.",
        )
        job_ended_publish(job=job)
    return count


@transaction.atomic
def job_preempt(*, job_id: int, reason: str, data: dict | None = None) -> bool:
    """Ask a running job to checkpoint and return to the queue; its runner does the rest.

    A job placed but not started yet has nothing to checkpoint and goes back to the queue at once.
    """
    job = (
        Job.objects.select_for_update()
        .filter(pk=job_id, state__in=[JobState.RUNNING, JobState.SCHEDULED])
        .first()
    )
    if job is None:
        return False
    if job.state == JobState.SCHEDULED:
        attempt_close(job=job, outcome=JobAttempt.Outcome.PREEMPTED)
        job.transition_to(JobState.QUEUED)
        attempt_release(job)
        job.waiting_reason = reason[:255]
        job.save()
    else:
        job.transition_to(JobState.PREEMPTED)
        job.save(update_fields=["state"])
    job_event(job=job, kind="preempted", message=reason, data=data)
    return True


def replicas_move_off_draining() -> int:
    """Ask the replicas on draining machines to move (inside the tick): a replica never ends by
    itself, so a drain would wait forever. Each drains its requests, goes back to the queue and
    is placed on another machine; the draining one gets nothing new."""
    moving = Job.objects.filter(
        kind=Job.Kind.SERVE, state=JobState.RUNNING, worker__status=Worker.Status.DRAINING
    ).values_list("pk", flat=True)
    return sum(
        job_preempt(job_id=job_id, reason="Its machine is draining; moving to another one.")
        for job_id in list(moving)
    )
