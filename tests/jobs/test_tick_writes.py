"""What a scheduling pass writes: only the queued jobs whose decision changed (issue 15).

A waiting job stores its reason and reservation (machine, expected start); the ETA a person reads
and the job's queue position are worked out when read, so a pass where nothing changed writes
no job row although time went on.
"""

import re
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.urls import reverse
from django.utils import timezone

from jobs.models import Job, JobState, Quota
from jobs.scheduler import schedule
from jobs.scheduler.apply import decisions_apply, scheduler_pass
from jobs.scheduler.snapshot import snapshot_load
from jobs.services.attempts import attempt_claim
from tests.factories import JobFactory

pytestmark = pytest.mark.django_db

WRITE = re.compile(r'^\s*(?:UPDATE|INSERT INTO|DELETE FROM)\s+"?(\w+)"?', re.IGNORECASE)


class JobRowsWritten:
    """Rows of jobs_job written by INSERT, UPDATE and DELETE, from each cursor's rowcount."""

    def __init__(self):
        self.rows = 0

    def __call__(self, execute, sql, params, many, context):
        result = execute(sql, params, many, context)
        match = WRITE.match(sql)
        if match and match.group(1) == Job._meta.db_table:
            self.rows += max(0, context["cursor"].rowcount)
        return result


def _pass_at(now) -> tuple[int, object]:
    """One pass as the tick runs it, with the pool's clock at `now`; the job rows it wrote."""
    counter = JobRowsWritten()
    with connection.execute_wrapper(counter), transaction.atomic():
        snapshot, current = snapshot_load(now=now)
        decisions = schedule(snapshot)
        decisions_apply(decisions=decisions, current=current, now=now)
    return counter.rows, decisions


def _job_rows() -> dict[int, dict]:
    return {row["id"]: row for row in Job.objects.values()}


@pytest.fixture
def reserved_pool(register_worker, org, a100, settings):
    """One 2-GPU a100 machine, both GPUs running hour-long jobs: a 2-GPU job waits with the
    machine reserved, a 1-GPU job waits for a free GPU."""
    settings.WORKER_OFFLINE_AFTER_S = 3600  # no lease runs out while a slow machine runs the test
    Quota.objects.create(organization=org, resource_class=a100, limit_gpus=8)
    register_worker("a", gpus=2)
    running = JobFactory(organization=org, resource_class=a100, max_runtime_s=3600)
    scheduler_pass()
    running.refresh_from_db()
    attempt_claim(job_id=running.pk, attempt=running.attempt, worker_id=running.worker_id)
    blocker = JobFactory(organization=org, resource_class=a100, max_runtime_s=3600)
    scheduler_pass()  # takes the second slot
    blocker.refresh_from_db()
    attempt_claim(job_id=blocker.pk, attempt=blocker.attempt, worker_id=blocker.worker_id)
    big = JobFactory(organization=org, resource_class=a100, gpu_count=2, max_runtime_s=600)
    small = JobFactory(organization=org, resource_class=a100, max_runtime_s=7200)
    scheduler_pass()
    return big, small


def test_a_second_pass_with_nothing_changed_writes_no_job_row(reserved_pool):
    big, small = reserved_pool
    big.refresh_from_db()
    assert big.reserved_machine is not None and big.expected_start_at is not None
    before = _job_rows()

    counter = JobRowsWritten()
    with connection.execute_wrapper(counter):
        assert scheduler_pass() is not None  # the tick itself, at once
    assert counter.rows == 0 and _job_rows() == before

    later = timezone.now() + timedelta(minutes=10)
    rows, decisions = _pass_at(later)

    assert rows == 0 and _job_rows() == before
    # The pass still words the reservation as of its clock: ten minutes closer than it was.
    reasons = {w.job_id: w.reason for w in decisions.waiting}
    assert reasons[big.pk].endswith(
        f"(reserved: machine {big.reserved_machine}, expected in ~50 min)"
    )
    assert reasons[small.pk] == "waiting for 1 free a100-40gb on one machine"


def test_what_a_person_reads_counts_down_from_the_stored_reservation(
    reserved_pool, org, owner, client_for, key_client_for
):
    big, small = reserved_pool
    big = Job.objects.get(pk=big.pk)
    machine = big.reserved_machine
    assert big.waiting_text == (
        f"waiting for 2 free a100-40gb on one machine (reserved: machine {machine}, "
        "expected in ~60 min)"
    )
    Job.objects.filter(pk=big.pk).update(expected_start_at=timezone.now() + timedelta(minutes=25))
    reads = (
        f"waiting for 2 free a100-40gb on one machine (reserved: machine {machine}, "
        "expected in ~25 min)"
    )
    html = client_for(owner).get(reverse("jobs:jobs", args=[org.slug])).content.decode()
    assert f"#1 · {reads}" in html
    api = key_client_for(owner, org, scopes=["jobs:read"])
    listed = api.get(f"/api/v1/orgs/{org.slug}/jobs/", {"state": "queued"}).json()["results"]
    # Positions are the order the scheduler takes the organization's jobs of one class.
    assert [(j["id"], j["queue_position"], j["waiting_reason"]) for j in listed] == [
        (small.pk, 2, "waiting for 1 free a100-40gb on one machine"),
        (big.pk, 1, reads),
    ]


def test_rows_written_are_the_rows_whose_decision_changed(reserved_pool, org, a100):
    big, _small = reserved_pool
    # A higher-priority job enters ahead of both: every position behind it moves, and the
    # reservation passes to it, but only the jobs whose own decision changed are written.
    urgent = JobFactory(
        organization=org, resource_class=a100, gpu_count=2, priority=10, max_runtime_s=600
    )
    before = _job_rows()

    rows, decisions = _pass_at(timezone.now() + timedelta(minutes=1))

    after = _job_rows()
    changed = {pk for pk in after if after[pk] != before[pk]}
    assert rows == len(changed)
    assert changed == {urgent.pk, big.pk}
    assert after[urgent.pk]["reserved_machine"] is not None
    assert (after[big.pk]["reserved_machine"], after[big.pk]["expected_start_at"]) == (None, None)
    assert after[big.pk]["waiting_reason"] == "waiting for 2 free a100-40gb on one machine"
    assert len(decisions.placements) == len(decisions.preemptions) == 0


def test_a_job_cancelled_meanwhile_keeps_its_state(reserved_pool):
    big, _small = reserved_pool
    now = timezone.now()
    snapshot, current = snapshot_load(now=now)
    decisions = schedule(snapshot)
    Job.objects.filter(pk=big.pk).update(
        state=JobState.CANCELLED, waiting_reason="", reserved_machine=None, expected_start_at=None
    )
    current[big.pk] = ("stale", None, None)  # as loaded before the cancel, for it to be written
    with transaction.atomic():
        decisions_apply(decisions=decisions, current=current, now=now)
    big.refresh_from_db()
    assert (big.state, big.waiting_reason, big.reserved_machine) == (JobState.CANCELLED, "", None)


def test_the_snapshot_reads_submit_times_to_the_microsecond(org):
    """PostgreSQL works out the epoch (the load's cost was decoding timestamps in Python); the
    policy orders by it, so it must be the very float the datetime gives."""
    now = timezone.now()
    jobs = [
        JobFactory(organization=org, created_at=now - timedelta(days=days, microseconds=micro))
        for days, micro in [(0, 1), (3, 499_999), (400, 500_000), (0, 999_999)]
    ]
    snapshot, _current = snapshot_load(now=now)
    submitted = {job.job_id: job.submitted_at for job in snapshot.queued}
    assert submitted == {job.pk: job.created_at.timestamp() for job in jobs}
