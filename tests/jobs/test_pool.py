"""The tick and the attempt lifecycle against the real database, without worker processes."""

import io
from datetime import timedelta
from decimal import Decimal

import pytest
from django.test import override_settings
from django.utils import timezone

from billing.models import UsageRecord
from jobs.models import Job, JobAttempt, JobState, Quota, Worker
from jobs.scheduler.apply import scheduler_pass
from jobs.services.attempts import (
    Report,
    StaleAttempt,
    attempt_checkpoint,
    attempt_claim,
    attempt_finish,
    attempt_report,
)
from jobs.services.pool import worker_heartbeat, worker_set_status
from tests.factories import JobFactory, OrganizationFactory

pytestmark = pytest.mark.django_db


def _place(job) -> Job:
    scheduler_pass()
    job.refresh_from_db()
    return job


def test_worker_registers_its_gpus_as_slots_of_the_matching_class(register_worker, a100):
    worker = register_worker("gpu-1", gpus=4)
    assert (worker.resource_class, worker.slots, worker.queue) == (a100, 4, "worker.gpu-1")
    cpu_worker = register_worker("cpu-1")
    assert cpu_worker.resource_class.name == "cpu" and cpu_worker.slots == 2


def test_a_pass_places_a_job_and_records_its_attempt(register_worker, org):
    worker = register_worker("cpu-1")
    job = _place(JobFactory(organization=org))
    assert job.state == JobState.SCHEDULED and job.attempt == 1
    assert job.worker == worker and job.slot_indices == [0]
    assert JobAttempt.objects.get(job=job).number == 1


def test_gang_jobs_never_split_across_machines(register_worker, org, a100):
    Quota.objects.create(organization=org, resource_class=a100, limit_gpus=8)
    register_worker("a", gpus=2)
    register_worker("b", gpus=2)
    job = _place(JobFactory(organization=org, resource_class=a100, gpu_count=4))
    assert job.state == JobState.QUEUED
    assert "4" in job.waiting_reason and job.queue_position == 1


def test_waiting_jobs_get_a_reason_and_a_position(register_worker, org):
    register_worker("cpu-1")
    jobs = [JobFactory(organization=org) for _ in range(4)]
    scheduler_pass()
    waiting = sorted(
        Job.objects.filter(pk__in=[j.pk for j in jobs], state=JobState.QUEUED),
        key=lambda j: j.queue_position,
    )
    assert [j.queue_position for j in waiting] == [1, 2]
    assert all(j.waiting_reason for j in waiting)


def test_guaranteed_tenant_reclaims_borrowed_slots_within_one_tick(register_worker, a100):
    register_worker("a", gpus=2)
    borrower, owner_of_guarantee = OrganizationFactory(), OrganizationFactory()
    Quota.objects.create(
        organization=borrower, resource_class=a100, guaranteed_gpus=0, limit_gpus=2
    )
    Quota.objects.create(
        organization=owner_of_guarantee, resource_class=a100, guaranteed_gpus=2, limit_gpus=2
    )
    borrowed = [JobFactory(organization=borrower, resource_class=a100) for _ in range(2)]
    scheduler_pass()
    for job in borrowed:
        job.refresh_from_db()
        attempt_claim(job_id=job.pk, attempt=job.attempt, worker_id=job.worker_id)
    claimant = JobFactory(organization=owner_of_guarantee, resource_class=a100)
    scheduler_pass()
    assert (
        Job.objects.filter(pk__in=[j.pk for j in borrowed], state=JobState.PREEMPTED).count() >= 1
    )
    claimant.refresh_from_db()
    assert "reclaim" in claimant.waiting_reason


def test_cordoned_worker_gets_no_new_jobs(register_worker, org):
    worker = register_worker("cpu-1")
    worker_set_status(worker=worker, status=Worker.Status.CORDONED)
    assert _place(JobFactory(organization=org)).state == JobState.QUEUED


def test_attempt_lifecycle_is_fenced_and_billed_once(register_worker, org):
    worker = register_worker("cpu-1")
    job = _place(JobFactory(organization=org))
    assert attempt_claim(job_id=job.pk, attempt=1, worker_id=worker.pk) is not None
    assert (
        attempt_claim(job_id=job.pk, attempt=1, worker_id=worker.pk) is None
    )  # a duplicate message
    state = attempt_report(
        job_id=job.pk,
        attempt=1,
        report=Report(
            logs=[("stdout", "epoch 1")], metrics=[{"step": 1, "name": "loss", "value": 0.5}]
        ),
    )
    assert state == JobState.RUNNING and job.logs.count() == 1 and job.metrics.count() == 1
    attempt_finish(job_id=job.pk, attempt=1, outcome="failed", reason="boom")
    with pytest.raises(StaleAttempt):
        attempt_finish(job_id=job.pk, attempt=1, outcome="failed", reason="again")
    assert UsageRecord.objects.filter(source_id=str(job.pk)).count() == 1
    job.refresh_from_db()
    assert job.state == JobState.FAILED and job.failure_reason == "boom"


@override_settings(WORKER_OFFLINE_AFTER_S=5, JOB_MAX_LOST_ATTEMPTS=3)
def test_a_silent_worker_loses_its_job_which_is_requeued_then_failed_after_three_losses(
    register_worker, org
):
    worker = register_worker("cpu-1")
    job = _place(JobFactory(organization=org))
    for expected_attempt in (1, 2, 3):
        job.refresh_from_db()
        assert job.attempt == expected_attempt
        attempt_claim(job_id=job.pk, attempt=job.attempt, worker_id=worker.pk)
        attempt_checkpoint(
            job_id=job.pk,
            attempt=job.attempt,
            key=f"orgs/{org.pk}/checkpoints/x{expected_attempt}/c.pt",
            step=10,
        )
        Job.objects.filter(pk=job.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
        Worker.objects.filter(pk=worker.pk).update(
            last_heartbeat_at=timezone.now() - timedelta(seconds=60)
        )
        scheduler_pass()  # reaps, then (until the third loss) places the job again
        with pytest.raises(StaleAttempt):
            attempt_report(
                job_id=job.pk, attempt=expected_attempt, report=Report(logs=[], metrics=[])
            )
        worker_heartbeat(worker_id=worker.pk)
        scheduler_pass()
    job.refresh_from_db()
    assert job.state == JobState.FAILED and "3 attempts" in job.failure_reason
    assert (
        list(JobAttempt.objects.filter(job=job).values_list("outcome", flat=True)) == ["lost"] * 3
    )
    assert UsageRecord.objects.filter(source_id=str(job.pk)).count() == 3
    assert all(r.quantity >= Decimal(0) for r in UsageRecord.objects.all())


def test_a_preempted_attempt_goes_back_to_the_queue_keeping_its_checkpoint(register_worker, org):
    worker = register_worker("cpu-1")
    job = _place(JobFactory(organization=org))
    attempt_claim(job_id=job.pk, attempt=1, worker_id=worker.pk)
    attempt_checkpoint(job_id=job.pk, attempt=1, key=f"orgs/{org.pk}/checkpoints/a/c.pt", step=7)
    Job.objects.filter(pk=job.pk).update(state=JobState.PREEMPTED)
    job = attempt_finish(job_id=job.pk, attempt=1, outcome="stopped")
    assert job.state == JobState.QUEUED and job.checkpoint_step == 7
    assert JobAttempt.objects.get(job=job).outcome == "preempted"


def test_only_the_attempts_own_reports_extend_its_lease(register_worker, org):
    worker = register_worker("cpu-1")
    job = _place(JobFactory(organization=org))
    attempt_claim(job_id=job.pk, attempt=1, worker_id=worker.pk)
    expired = timezone.now() - timedelta(seconds=1)
    Job.objects.filter(pk=job.pk).update(lease_expires_at=expired)
    worker_heartbeat(worker_id=worker.pk)  # the machine lives, but nothing runs the job
    assert Job.objects.get(pk=job.pk).lease_expires_at == expired
    attempt_report(job_id=job.pk, attempt=1, report=Report(logs=[], metrics=[]))
    assert Job.objects.get(pk=job.pk).lease_expires_at > timezone.now()


def test_a_worker_restarting_under_its_name_gives_up_its_old_jobs(register_worker, org):
    worker = register_worker("cpu-1")
    job = _place(JobFactory(organization=org))
    attempt_claim(job_id=job.pk, attempt=1, worker_id=worker.pk)
    register_worker("cpu-1")
    scheduler_pass()
    job.refresh_from_db()
    assert JobAttempt.objects.get(job=job, number=1).outcome == "lost"
    assert job.attempt == 2 and job.state == JobState.SCHEDULED


def test_preempting_a_job_not_started_yet_requeues_it_at_once(register_worker, org):
    from jobs.services.pool import job_preempt

    register_worker("cpu-1")
    job = _place(JobFactory(organization=org))
    assert job.state == JobState.SCHEDULED
    assert job_preempt(job_id=job.pk, reason="reclaimed")
    job.refresh_from_db()
    assert job.state == JobState.QUEUED and job.worker is None and job.slot_indices == []
    assert JobAttempt.objects.get(job=job).outcome == "preempted"


def test_an_ended_jobs_checkpoint_is_deleted_from_storage(
    register_worker, org, tmp_path, django_capture_on_commit_callbacks
):
    from registry.storage import get_storage, new_object_key

    with override_settings(STORAGE_BACKEND="local", STORAGE_LOCAL_ROOT=str(tmp_path)):
        worker = register_worker("cpu-1")
        job = _place(JobFactory(organization=org))
        attempt_claim(job_id=job.pk, attempt=1, worker_id=worker.pk)
        key = new_object_key(organization_id=org.pk, kind="checkpoints", filename="c.pt")
        get_storage().save(key, io.BytesIO(b"state"))
        attempt_checkpoint(job_id=job.pk, attempt=1, key=key, step=3)
        with django_capture_on_commit_callbacks(execute=True):
            attempt_finish(job_id=job.pk, attempt=1, outcome="failed", reason="boom")
        assert get_storage().size(key) is None
    assert Job.objects.get(pk=job.pk).checkpoint_key == ""
