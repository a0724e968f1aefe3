"""The job child a worker keeps warm: a job runs in a child forked (torch imported) before it,
and nothing a job leaves in its process, its folder, TMPDIR or HOME reaches the next job, of
another tenant, which runs in a fresh warm child."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from jobs.models import Job, JobLog, JobState
from jobs.runner import warm
from jobs.runner.isolation import child_threads
from jobs.runner.parent import run_attempt
from jobs.scheduler.apply import scheduler_pass
from jobs.services.pool import worker_register
from registry.services import dataset_create, dataset_version_create
from tenants.actors import Actor
from tests.factories import JobFactory
from tests.jobs.leaky_recipe import FOUND, LEAKY_ZYGOTE_COMMAND
from tests.jobs.test_pool_e2e import _separable_csv
from tests.processes import wait_for

# Every test here starts processes.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def worker(local_storage, settings, tmp_path, monkeypatch):
    """A CPU worker whose attempts, run in this process, take warm children of the `leaky`
    recipe's command."""
    settings.WORKER_WORKDIR = str(tmp_path / "work")
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the child starts in /
    monkeypatch.setattr(warm, "ZYGOTE_COMMAND", LEAKY_ZYGOTE_COMMAND)
    worker = worker_register(name=f"cpu-{uuid.uuid4().hex[:6]}", devices=[])
    warm.warm_children_keep(threads=child_threads(worker.slots))
    yield worker
    warm.warm_children_stop()


def _leaky_job(organization, member, tmp_path) -> Job:
    data = tmp_path / f"points-{organization.pk}.csv"
    data.write_bytes(_separable_csv(40))
    actor = Actor(user=member)
    version = dataset_version_create(
        dataset=dataset_create(organization=organization, name="points", actor=actor),
        path=data,
        filename="points.csv",
        actor=actor,
    )
    return JobFactory(
        organization=organization,
        recipe="leaky",
        parameters={"target": "label", "epochs": 1},
        input_dataset_version=version,
        created_by=member,
    )


def _run(job: Job, worker) -> dict:
    """Run the job's attempt here; what its recipe found left over, and its child's pid."""
    scheduler_pass()
    job.refresh_from_db()
    wait_for(warm._zygote.ready, timeout=120, what="the zygote's imports")
    warm.warm_child_replace()  # forks the next job's child, once the zygote has its imports
    waiting = warm._waiting  # the child forked before this job: the one it must run in
    assert waiting is not None and waiting.process.poll() is None
    outcome = run_attempt(job_id=job.pk, attempt=job.attempt, worker_id=worker.pk)
    job.refresh_from_db()
    assert outcome == "succeeded", job.failure_reason
    line = JobLog.objects.get(job=job, line__startswith=FOUND).line
    found = json.loads(line.removeprefix(FOUND))
    assert found.pop("pid") == waiting.process.pid
    assert waiting.process.poll() is not None, "a warm child serves one job"
    return found


@pytest.mark.django_db
def test_the_next_job_of_another_tenant_finds_nothing_a_job_left_in_its_warm_child(
    worker, org, other_org, member_factory, tmp_path
):
    nothing = {"global": [], "class": "", "environ": "", "folder": [], "tmp": [], "home": []}
    first = _leaky_job(org, member_factory(org, "owner"), tmp_path)
    assert _run(first, worker) == nothing
    second = _leaky_job(other_org, member_factory(other_org, "owner"), tmp_path)
    assert _run(second, worker) == nothing
    assert Job.objects.get(pk=second.pk).state == JobState.SUCCEEDED
