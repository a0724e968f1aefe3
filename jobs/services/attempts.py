"""An attempt's life on a worker, fenced by the attempt number: claim, report, checkpoint, finish.

Every write checks, under a row lock, that the job is still on this attempt; a worker that lost
its lease (and whose job was handed to another worker) can no longer change anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from billing.selectors import gpu_resource, usage_latest_keyed
from billing.services import usage_record
from jobs.models import (
    ACTIVE_STATES,
    Job,
    JobAttempt,
    JobLog,
    JobMetric,
    JobState,
    UtilizationSample,
)
from jobs.utilization import Sample, summary_merge
from registry.services.storage_accounts import stored_objects_delete

from .events import job_ended_publish, job_event
from .ticks import tick_soon


class StaleAttempt(Exception):
    """The job moved on to another attempt (or ended); this worker must stop writing."""


def lease_deadline():
    return timezone.now() + timedelta(seconds=settings.WORKER_OFFLINE_AFTER_S)


def _locked(job_id: int, attempt: int) -> Job:
    job = Job.objects.select_for_update().filter(pk=job_id, attempt=attempt).first()
    if job is None or not job.is_active:
        raise StaleAttempt(f"job {job_id} is no longer on attempt {attempt}")
    return job


def attempt_close(*, job: Job, outcome: str, ended_at=None) -> JobAttempt | None:
    """End the job's current attempt record (inside the caller's transaction)."""
    attempt = JobAttempt.objects.filter(
        job=job, number=job.attempt, outcome=JobAttempt.Outcome.ACTIVE
    ).first()
    if attempt is None:
        return None
    ended_at = ended_at or timezone.now()
    if attempt.started_at is not None:
        ended_at = max(ended_at, attempt.started_at)
    attempt.outcome, attempt.ended_at = outcome, ended_at
    attempt.save(update_fields=["outcome", "ended_at"])
    return attempt


def checkpoint_forget(*, job: Job) -> None:
    """A job that has ended needs no checkpoint: delete its object after the commit."""
    key = job.checkpoint_key
    if key:
        job.checkpoint_key, job.checkpoint_step = "", None
        transaction.on_commit(lambda: stored_objects_delete([key]))


def job_model_name(job: Job) -> str:
    """The model a job's cost is attributed to: the one it trains, else the one it runs."""
    if job.output_model_name:
        return job.output_model_name
    if job.input_model_version_id:
        return job.input_model_version.registered_model.name
    return ""


def _bill(*, job: Job, attempt: int, start, end, idempotency_key: str) -> int:
    """One usage row for the job's slots from `start` to `end`; a replayed key bills nothing."""
    seconds = max(0.0, (end - start).total_seconds())
    record, created = usage_record(
        organization=job.organization,
        resource=gpu_resource(job.resource_class.name),
        quantity=Decimal(str(round(seconds * job.gpu_count, 3))),
        unit="gpu_second",
        period_start=start,
        period_end=max(start, end),
        idempotency_key=idempotency_key,
        source_type="job_attempt",
        source_id=str(job.pk),
        attempt=attempt,
        user=job.created_by,
        api_key=job.created_by_api_key,
        labels=job.labels,
        model_name=job_model_name(job),
    )
    if not created:
        return 0
    Job.objects.filter(pk=job.pk).update(cost_minor=job.cost_minor + record.amount_minor)
    job.cost_minor += record.amount_minor
    return record.amount_minor


def _part_prefix(job: Job, attempt: int) -> str:
    return f"job:{job.pk}:attempt:{attempt}:part:"


def _billed_parts(job: Job, attempt: int) -> int:
    """How many whole SERVE_BILLING_INTERVAL_S parts of a running attempt the ledger holds."""
    latest = usage_latest_keyed(
        organization=job.organization, key_prefix=_part_prefix(job, attempt)
    )
    return 0 if latest is None else int(latest.idempotency_key.rpartition(":")[2]) + 1


def _part_bounds(started_at, part: int) -> tuple:
    interval = timedelta(seconds=settings.SERVE_BILLING_INTERVAL_S)
    return started_at + part * interval, started_at + (part + 1) * interval


def attempt_bill(*, job: Job, attempt: JobAttempt) -> int:
    """One usage row per attempt that ran, keyed by job and attempt so a replay bills nothing;
    for an attempt billed while it ran (a serve job's), that row is the rest after its parts."""
    if attempt.started_at is None or attempt.ended_at is None:
        return 0
    start = attempt.started_at
    if job.kind == Job.Kind.SERVE:
        start = min(_part_bounds(start, _billed_parts(job, attempt.number))[0], attempt.ended_at)
    return _bill(
        job=job,
        attempt=attempt.number,
        start=start,
        end=attempt.ended_at,
        idempotency_key=f"job:{job.pk}:attempt:{attempt.number}",
    )


@transaction.atomic
def attempt_bill_running(*, job_id: int, attempt: int, now=None) -> int:
    """Bill the whole SERVE_BILLING_INTERVAL_S parts a running attempt has held its slots for
    and the ledger lacks, one row each keyed by its number, so usage and budgets see a
    replica's hours while it serves and a retried call bills nothing twice. `attempt_bill`
    bills the rest when the attempt ends."""
    job = _locked(job_id, attempt)
    record = JobAttempt.objects.filter(job=job, number=attempt).first()
    if record is None or record.started_at is None:
        return 0
    now = now or timezone.now()
    held = (now - record.started_at).total_seconds()
    complete = int(held // settings.SERVE_BILLING_INTERVAL_S)
    amount = 0
    for part in range(_billed_parts(job, attempt), complete):
        start, end = _part_bounds(record.started_at, part)
        amount += _bill(
            job=job,
            attempt=attempt,
            start=start,
            end=end,
            idempotency_key=f"{_part_prefix(job, attempt)}{part}",
        )
    return amount


@transaction.atomic
def attempt_claim(*, job_id: int, attempt: int, worker_id: int) -> Job | None:
    """scheduled -> running, only for the attempt and worker it was placed with."""
    job = (
        Job.objects.select_for_update(of=("self",))
        .select_related(
            "resource_class", "input_dataset_version", "input_model_version", "organization"
        )
        .filter(pk=job_id, attempt=attempt, worker_id=worker_id, state=JobState.SCHEDULED)
        .first()
    )
    if job is None:
        return None
    now = timezone.now()
    job.transition_to(JobState.RUNNING)
    job.started_at = job.started_at or now
    job.lease_expires_at = lease_deadline()
    job.progress = None  # this attempt's own, once it reports a step
    job.save(update_fields=["state", "started_at", "lease_expires_at", "progress"])
    JobAttempt.objects.filter(job=job, number=attempt).update(started_at=now)
    job_event(job=job, kind="started", message=f"Attempt {attempt} started on {job.worker.name}.")
    return job


def job_resume_words(job: Job) -> str:
    """What a job back in the queue waits to do: a replica starts again, a job resumes."""
    if job.kind == Job.Kind.SERVE:
        return "serve again on a machine with a free slot"
    return "resume from its checkpoint"


def attempt_release(job: Job) -> None:
    """What an attempt held on its worker, let go as it ends (the caller saves the job): its
    slots, its lease, and a replica's address, so nothing routes to a server that is gone."""
    job.worker, job.slot_indices, job.lease_expires_at = None, [], None
    job.serve_address, job.serve_ready_at = "", None


@transaction.atomic
def attempt_advertise(*, job_id: int, attempt: int, address: str) -> bool:
    """A serve job's server answers at `address` ("host:port"): record it, and when, for the
    web to route to. A job asked to stop meanwhile is not advertised; False then."""
    job = _locked(job_id, attempt)
    if job.state != JobState.RUNNING:
        return False
    job.serve_address, job.serve_ready_at = address, timezone.now()
    job.save(update_fields=["serve_address", "serve_ready_at"])
    job_event(job=job, kind="serving", message=f"Attempt {attempt} answers at {address}.")
    return True


@dataclass
class Report:
    """What a running attempt sends back in one flush."""

    logs: list[tuple[str, str]]  # (stream, line)
    metrics: list[dict]  # {"step", "name", "value", "split"}
    progress: dict | None = None  # the newest {"step", "total", "epoch"} since the last report
    samples: list[Sample] = field(default_factory=list)  # utilization since the last report
    # Thin the attempt's stored samples to every other one (after adding these), as its sampler
    # counts them (jobs.runner.sampler.Sampler.drain).
    thin_samples: bool = False


@transaction.atomic
def attempt_report(*, job_id: int, attempt: int, report: Report) -> str:
    """Store logs, metrics and progress and extend the lease; returns the job's state so the
    runner can react to cancel/preempt. Only a runner that reports keeps its job: a dead one lets
    the lease lapse."""
    job = _locked(job_id, attempt)
    changes: dict = {"lease_expires_at": lease_deadline()}
    if report.progress is not None:
        changes["progress"] = report.progress
    JobLog.objects.bulk_create(
        JobLog(
            organization_id=job.organization_id,
            job=job,
            attempt=attempt,
            stream=stream,
            line=line[:10_000],
        )
        for stream, line in report.logs
    )
    JobMetric.objects.bulk_create(
        JobMetric(
            organization_id=job.organization_id,
            job=job,
            attempt=attempt,
            step=int(m["step"]),
            name=str(m["name"])[:100],
            split=str(m.get("split", ""))[:20],
            value=float(m["value"]),
        )
        for m in report.metrics
    )
    if report.samples or report.thin_samples:
        summary = _samples_store(
            job=job, attempt=attempt, samples=report.samples, thin=report.thin_samples
        )
        if summary is not None:
            changes["utilization"] = summary
    # One update of the job's row per report: the lease, and progress and the utilization
    # summary when the report moved them.
    Job.objects.filter(pk=job.pk).update(**changes)
    return job.state


def _samples_store(*, job: Job, attempt: int, samples: list[Sample], thin: bool) -> dict | None:
    """Add the samples (one insert) and fold them into the attempt's summary, which is returned
    for the job's row; thinning keeps the 1st, 3rd, 5th... of the attempt's samples in time
    order. None when there is no new sample (or no attempt row) to fold."""
    UtilizationSample.objects.bulk_create(
        UtilizationSample(
            organization_id=job.organization_id,
            job=job,
            attempt=attempt,
            at=sample.at,
            seconds=sample.seconds,
            cpu_cores=sample.cpu_cores,
            memory_bytes=sample.memory_bytes,
            gpu_utilization=sample.gpu_utilization,
            gpu_memory_bytes=sample.gpu_memory_bytes,
        )
        for sample in samples
    )
    if thin:
        kept = UtilizationSample.objects.filter(job=job, attempt=attempt).order_by("at", "pk")
        ids = list(kept.values_list("pk", flat=True))
        UtilizationSample.objects.filter(pk__in=ids[1::2]).delete()
    if not samples:
        return None
    record = JobAttempt.objects.filter(job=job, number=attempt).only("utilization").first()
    if record is None:
        return None
    summary = summary_merge(record.utilization, samples)
    JobAttempt.objects.filter(pk=record.pk).update(utilization=summary)
    return summary


@transaction.atomic
def attempt_checkpoint(*, job_id: int, attempt: int, key: str, step: int) -> str | None:
    """Point the job at its newest checkpoint; returns the key it replaces (to delete), if any."""
    job = _locked(job_id, attempt)
    previous = job.checkpoint_key
    job.checkpoint_key, job.checkpoint_step = key, step
    job.save(update_fields=["checkpoint_key", "checkpoint_step"])
    return previous or None


@transaction.atomic
def attempt_finish(
    *,
    job_id: int,
    attempt: int,
    outcome: str,
    reason: str = "",
    output_model_version_id: int | None = None,
    output_dataset_version_id: int | None = None,
) -> Job:
    """End the attempt: bill it once, then move the job to its next state.

    `outcome` is what the runner saw: succeeded, failed, or stopped (after a cancel or a
    preemption request, which the job's current state tells apart).
    """
    job = _locked(job_id, attempt)
    now = timezone.now()
    if job.state == JobState.CANCELLING:
        # The person asked to cancel: that is the outcome, whatever the child did meanwhile.
        outcome = JobAttempt.Outcome.CANCELLED
    elif outcome == "stopped":
        outcome = JobAttempt.Outcome.PREEMPTED
    record = attempt_close(job=job, outcome=outcome, ended_at=now)
    if record is not None:
        attempt_bill(job=job, attempt=record)
    attempt_release(job)
    if outcome == JobAttempt.Outcome.SUCCEEDED:
        job.transition_to(JobState.SUCCEEDED)
        job.output_model_version_id = output_model_version_id
        job.output_dataset_version_id = output_dataset_version_id
    elif outcome == JobAttempt.Outcome.FAILED:
        job.transition_to(JobState.FAILED)
        job.failure_reason = reason[:5000]
    elif outcome == JobAttempt.Outcome.CANCELLED:
        job.transition_to(JobState.CANCELLED)
    else:
        job.transition_to(JobState.QUEUED)
        job.waiting_reason = f"preempted; waiting to {job_resume_words(job)}"
    if job.is_terminal:
        job.finished_at = now
        checkpoint_forget(job=job)
    job.save()
    job_event(job=job, kind=outcome, message=reason[:500] or f"Attempt {attempt} {outcome}.")
    job_ended_publish(job=job)
    transaction.on_commit(tick_soon)
    return job


def attempt_state(*, job_id: int, attempt: int) -> str | None:
    """The job's state while this attempt is current, else None."""
    return (
        Job.objects.filter(pk=job_id, attempt=attempt, state__in=ACTIVE_STATES)
        .values_list("state", flat=True)
        .first()
    )
