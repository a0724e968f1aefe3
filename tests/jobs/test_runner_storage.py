"""The worker side of a storage outage: inputs and outputs wait it out, a failed checkpoint is
skipped."""

import pytest

from jobs.models import JobLog, JobState
from jobs.runner import parent
from jobs.runner.parent import _Attempt
from jobs.scheduler.apply import scheduler_pass
from jobs.services import job_cancel
from jobs.services.attempts import attempt_claim
from registry.storage import ObjectNotFound, StorageError
from tenants.actors import Actor
from tests.factories import JobFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def running(register_worker, org, tmp_path, monkeypatch):
    """A claimed, running attempt, and the `_Attempt` that runs it (no child process)."""
    worker = register_worker("cpu-storage")
    job = JobFactory(organization=org)
    scheduler_pass()
    job = attempt_claim(job_id=job.pk, attempt=1, worker_id=worker.pk)
    assert job is not None
    monkeypatch.setattr(parent.time, "sleep", lambda seconds: None)  # no real waiting in tests
    return _Attempt(job, 1, tmp_path)


OUTAGE = StorageError("S3 request for x failed")


def _failing(times: int, error=OUTAGE):
    calls = []

    def write_spec(self):
        calls.append(1)
        if len(calls) <= times:
            raise error

    return write_spec, calls


def test_inputs_are_fetched_again_while_storage_is_down(running, monkeypatch, settings):
    settings.JOB_STORAGE_RETRY_S = 60
    write_spec, calls = _failing(3)
    monkeypatch.setattr(_Attempt, "_write_spec", write_spec)
    assert running._through_outage(running._write_spec) is True
    assert len(calls) == 4
    logged = JobLog.objects.filter(job=running.job).values_list("line", flat=True)
    assert any("Storage unavailable" in line for line in logged)


def test_a_missing_input_fails_at_once(running, monkeypatch, settings):
    settings.JOB_STORAGE_RETRY_S = 60
    write_spec, calls = _failing(99, ObjectNotFound("orgs/1/datasets/x"))
    monkeypatch.setattr(_Attempt, "_write_spec", write_spec)
    with pytest.raises(ObjectNotFound):
        running._through_outage(running._write_spec)
    assert len(calls) == 1


def test_storage_down_longer_than_the_retry_window_fails_the_attempt(
    running, monkeypatch, settings
):
    settings.JOB_STORAGE_RETRY_S = 0
    write_spec, _ = _failing(99)
    monkeypatch.setattr(_Attempt, "_write_spec", write_spec)
    assert running.run() == "failed"
    running.job.refresh_from_db()
    assert running.job.state == JobState.FAILED
    assert "Could not prepare inputs" in running.job.failure_reason


def test_a_job_cancelled_while_waiting_for_storage_stops(running, monkeypatch, settings, owner):
    settings.JOB_STORAGE_RETRY_S = 60
    write_spec, calls = _failing(99)
    monkeypatch.setattr(_Attempt, "_write_spec", write_spec)
    job_cancel(job=running.job, actor=Actor(user=owner))
    assert running.run() == "stopped"
    assert len(calls) == 1
    running.job.refresh_from_db()
    assert running.job.state == JobState.CANCELLED


def test_a_checkpoint_that_cannot_be_stored_is_skipped(running, monkeypatch):
    def refuse(*args, **kwargs):
        raise StorageError("S3 request for checkpoint failed")

    monkeypatch.setattr(running.storage, "save", refuse)
    path = running.workdir / "checkpoint-3.pt"
    path.write_bytes(b"weights")
    running._checkpoint({"path": path.name, "step": 3})  # no exception: the job goes on
    assert not path.exists()
    running.job.refresh_from_db()
    assert running.job.checkpoint_key == ""
    assert any("not stored" in line for _, line in running.logs)
