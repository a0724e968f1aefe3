"""Apply a scheduling pass to the database in one transaction, and dispatch after commit."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from celery import current_app
from django.db import connection, transaction
from django.utils import timezone

from jobs.models import Job, JobAttempt, JobState, Worker
from jobs.services.attempts import lease_deadline
from jobs.services.events import job_event
from jobs.services.pool import job_preempt, reap_lost, replicas_move_off_draining
from jobs.services.sweeps import sweeps_progress

from . import schedule
from .snapshot import snapshot_load
from .types import Decisions

logger = logging.getLogger(__name__)

# One key for the whole pool: only one scheduling pass runs at a time, across all processes.
SCHEDULER_LOCK_KEY = 0x5CED


@dataclass(frozen=True)
class Dispatch:
    job_id: int
    attempt: int
    queue: str


def _try_lock() -> bool:
    if connection.vendor != "postgresql":
        # SQLite (embedded): its transactions are IMMEDIATE, so passes already run one at a time.
        return True
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [SCHEDULER_LOCK_KEY])
        return cursor.fetchone()[0]


def scheduler_pass() -> Decisions | None:
    """Reap, snapshot, decide, apply; the decisions, or None if another pass holds the lock."""
    with transaction.atomic():
        if not _try_lock():
            return None
        now = timezone.now()
        reap_lost(now=now)
        replicas_move_off_draining()
        snapshot, current = snapshot_load(now=now)
        decisions = schedule(snapshot)
        dispatches = decisions_apply(decisions=decisions, current=current)
        transaction.on_commit(lambda: dispatch(dispatches))
    sweeps_progress()
    return decisions


def decisions_apply(
    *, decisions: Decisions, current: dict[int, tuple[str, int | None]]
) -> list[Dispatch]:
    now = timezone.now()
    workers = Worker.objects.in_bulk([p.machine_id for p in decisions.placements])
    placed = Job.objects.select_for_update().in_bulk([p.job_id for p in decisions.placements])
    dispatches = []
    for placement in decisions.placements:
        job, worker = placed.get(placement.job_id), workers.get(placement.machine_id)
        if job is None or job.state != JobState.QUEUED or worker is None:
            continue
        job.transition_to(JobState.SCHEDULED)
        job.attempt += 1
        job.worker, job.slot_indices = worker, list(placement.slots)
        job.scheduled_at, job.lease_expires_at = now, lease_deadline()
        job.waiting_reason, job.queue_position = "", None
        job.save()
        JobAttempt.objects.create(
            organization_id=job.organization_id,
            job=job,
            number=job.attempt,
            worker=worker,
            slot_indices=job.slot_indices,
            scheduled_at=now,
        )
        job_event(
            job=job,
            kind="scheduled",
            message=f"Placed on {worker.name}, GPUs {', '.join(map(str, placement.slots))}.",
        )
        dispatches.append(Dispatch(job.pk, job.attempt, worker.queue))

    for preemption in decisions.preemptions:
        job_preempt(
            job_id=preemption.job_id,
            reason=preemption.reason,
            data={"for_job": preemption.for_job_id},
        )

    changed = [
        w for w in decisions.waiting if current.get(w.job_id) != (w.reason[:255], w.position)
    ]
    if changed:
        rows = [
            Job(pk=w.job_id, waiting_reason=w.reason[:255], queue_position=w.position)
            for w in changed
        ]
        # Only queued jobs take a waiting reason; one cancelled meanwhile keeps its state.
        still_queued = set(
            Job.objects.filter(
                pk__in=[w.job_id for w in changed], state=JobState.QUEUED
            ).values_list("pk", flat=True)
        )
        Job.objects.bulk_update(
            [r for r in rows if r.pk in still_queued],
            ["waiting_reason", "queue_position"],
            batch_size=1000,
        )
    return dispatches


def dispatch(dispatches: list[Dispatch]) -> None:
    # A message that cannot be sent leaves its job scheduled; its lease lapses and the job is
    # placed again without counting as a lost attempt.
    for item in dispatches:
        try:
            current_app.send_task(
                "jobs.run_attempt", args=[item.job_id, item.attempt], queue=item.queue
            )
        except Exception:
            logger.exception("could not dispatch job %s attempt %s", item.job_id, item.attempt)
            continue
        logger.info("dispatched job %s attempt %s to %s", item.job_id, item.attempt, item.queue)
