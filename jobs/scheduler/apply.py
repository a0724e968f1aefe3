"""Apply a scheduling pass to the database in one transaction, and dispatch after commit."""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from celery import current_app
from django.db import connection, transaction
from django.utils import timezone

from jobs.models import Job, JobAttempt, JobState, Worker
from jobs.services.attempts import lease_deadline
from jobs.services.events import job_event
from jobs.services.pool import job_preempt, reap_lost, replicas_move_off_draining
from jobs.services.sweeps import sweeps_progress

from . import schedule
from .snapshot import StoredWaiting, snapshot_load
from .types import Decisions, Waiting

logger = logging.getLogger(__name__)

# One key for the whole pool: only one scheduling pass runs at a time, across all processes.
SCHEDULER_LOCK_KEY = 0x5CED
# Queued jobs rewritten per UPDATE statement (four parameters each).
WAITING_BATCH = 1000
# One statement for a batch of changed waiting reasons, as rows of (id, reason, machine, expected
# start); `{values}` takes one placeholder row per job. A job no longer queued keeps its state.
WAITING_UPDATE = (
    "UPDATE jobs_job AS job SET waiting_reason = v.reason, reserved_machine = v.machine, "
    "expected_start_at = v.expected FROM (VALUES {values}) AS v(id, reason, machine, expected) "
    "WHERE job.id = v.id AND job.state = %s"
)


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


@contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Hold Python's cycle collector off for one pass.

    A pass makes tens of thousands of objects that live until it ends (rows, the snapshot, the
    decisions); they push the collector into full collections, each walking the whole process
    heap: on the bench's pool a full collection cost as much as the rest of the load. Those
    objects hold no cycles, so reference counting frees them; the collector resumes after.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def scheduler_pass() -> Decisions | None:
    """Reap, snapshot, decide, apply; the decisions, or None if another pass holds the lock."""
    with cyclic_gc_paused(), transaction.atomic():
        if not _try_lock():
            return None
        now = timezone.now()
        reap_lost(now=now)
        replicas_move_off_draining()
        snapshot, current = snapshot_load(now=now)
        decisions = schedule(snapshot)
        dispatches = decisions_apply(decisions=decisions, current=current, now=now)
        transaction.on_commit(lambda: dispatch(dispatches))
    sweeps_progress()
    return decisions


def decisions_apply(
    *, decisions: Decisions, current: dict[int, StoredWaiting], now: datetime
) -> list[Dispatch]:
    """Place, preempt, and store the waiting reasons that changed; the run messages to send.

    `now` is the snapshot's: a job placed is scheduled at the moment the pass decided from, so
    the next pass counts its expected end, and the reservations behind it, as this one did
    (and leaves them unwritten).
    """
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
        job.clear_waiting()
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

    # The policy offers victims already stopping first, and asking them again changes nothing:
    # one read finds the victims still to ask, not one locked read (and savepoint) per victim.
    to_stop = set(
        Job.objects.filter(
            pk__in=[p.job_id for p in decisions.preemptions],
            state__in=[JobState.RUNNING, JobState.SCHEDULED],
        ).values_list("pk", flat=True)
    )
    for preemption in decisions.preemptions:
        if preemption.job_id not in to_stop:
            continue
        job_preempt(
            job_id=preemption.job_id,
            reason=preemption.reason,
            data={"for_job": preemption.for_job_id},
        )

    waiting_store(waiting_changed(decisions.waiting, current, now=now))
    return dispatches


def stored_waiting(waiting: Waiting) -> StoredWaiting:
    """What a queued job stores of its decision: the reason, and a reservation as its machine
    and expected start, which stay put from tick to tick (its ETA is worked out when read)."""
    reservation = waiting.reservation
    if reservation is None:
        return waiting.reason[:255], None, None
    expected = datetime.fromtimestamp(reservation.expected_at, tz=UTC)
    return reservation.waiting_for[:255], reservation.machine_id, expected


def waiting_changed(
    waiting: Iterable[Waiting], current: dict[int, StoredWaiting], *, now: datetime
) -> list[tuple[int, StoredWaiting]]:
    """The queued jobs whose stored decision changed, with what they store now.

    A reservation already due reads "~1 min" whenever it was due: one due before and due still
    (a running job past its expected end, whose release the pass puts at its `now`) is unchanged.
    """
    changed = []
    for item in waiting:
        stored, old = stored_waiting(item), current.get(item.job_id)
        if stored == old:
            continue
        if (
            old is not None
            and stored[:2] == old[:2]
            and stored[2] is not None
            and old[2] is not None
            and max(stored[2], old[2]) <= now
        ):
            continue
        changed.append((item.job_id, stored))
    return changed


def waiting_store(changed: list[tuple[int, StoredWaiting]]) -> None:
    """Write the changed waiting reasons, only to jobs still queued (one cancelled meanwhile
    keeps its state): on PostgreSQL one `UPDATE ... FROM (VALUES ...)` per batch."""
    if not changed:
        return
    if connection.vendor != "postgresql":
        # SQLite (embedded): few jobs; Django's bulk update is enough there.
        jobs = {
            job.pk: job
            for job in Job.objects.filter(pk__in=[pk for pk, _ in changed], state=JobState.QUEUED)
        }
        for pk, (reason, machine, expected) in changed:
            if pk in jobs:
                jobs[pk].waiting_reason, jobs[pk].reserved_machine = reason, machine
                jobs[pk].expected_start_at = expected
        Job.objects.bulk_update(
            jobs.values(), ["waiting_reason", "reserved_machine", "expected_start_at"]
        )
        return
    with connection.cursor() as cursor:
        for start in range(0, len(changed), WAITING_BATCH):
            batch = changed[start : start + WAITING_BATCH]
            values = ", ".join(["(%s, %s, %s::integer, %s::timestamptz)"] * len(batch))
            cursor.execute(
                WAITING_UPDATE.format(values=values),
                [value for pk, stored in batch for value in (pk, *stored)] + [JobState.QUEUED],
            )


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
