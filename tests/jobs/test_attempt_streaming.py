"""What a running job's child says reaches the person watching while it runs: its progress (where
it is inside an epoch), metrics and log lines are stored as they arrive and shown on the job's
page and in the API, not only when an epoch ends."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
from django.urls import reverse

from jobs.models import Job, JobLog, JobMetric
from jobs.runner.protocol import format_line
from jobs.scheduler.apply import scheduler_pass
from jobs.services.pool import worker_register
from tests.factories import JobFactory
from tests.jobs.held_attempt import attempt_start, points_version
from tests.processes import wait_for

REPO = Path(__file__).resolve().parents[2]
e2e = pytest.mark.django_db(transaction=True)

# A child that says its lines, then holds until the test has seen them stored.
HELD = r"""
import json, sys, time
from pathlib import Path

from jobs.runner.child import prepare

plan = json.loads(sys.argv[1])
prepare([])
for line in plan["lines"]:
    print(line, flush=True)
release = Path(plan["release"])
while not release.exists():
    time.sleep(0.01)
print("released", file=sys.stderr)
sys.exit(1)
"""


@pytest.fixture
def attempt_running(local_storage, org, owner, tmp_path, settings, monkeypatch):
    """Start attempt 1 of a new job of `org` on a thread, its child started cold as `script`
    with `plan` as its argument; returns the job, the thread and the list its outcome joins."""
    settings.WORKER_WORKDIR = str(tmp_path / "work")
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the child starts in /

    def start(script: str, plan: dict) -> tuple[Job, threading.Thread, list]:
        worker = worker_register(name=f"cpu-{uuid.uuid4().hex[:6]}", devices=[])
        version = points_version(org, owner, tmp_path)
        job = JobFactory(organization=org, input_dataset_version=version, created_by=owner)
        scheduler_pass()
        return (job, *attempt_start(job, worker, script, plan, monkeypatch))

    return start


@e2e
@pytest.mark.slow
def test_progress_metrics_and_logs_are_shown_while_the_child_still_runs(
    attempt_running, org, owner, client, client_for, tmp_path
):
    release = tmp_path / "release"
    plan = {
        "lines": [
            "Training on 40 rows.",
            format_line("progress", {"step": 3, "total": 10, "epoch": 2}),
            format_line("metric", {"step": 3, "name": "loss", "value": 0.5, "split": "train"}),
        ],
        "release": str(release),
    }
    job, runner, outcome = attempt_running(HELD, plan)
    try:
        wait_for(
            lambda: Job.objects.get(pk=job.pk).progress is not None,
            timeout=60,
            what="the child's progress to be stored",
        )
        assert Job.objects.get(pk=job.pk).progress == {"step": 3, "total": 10, "epoch": 2}
        wait_for(
            lambda: JobMetric.objects.filter(job=job).exists(),
            timeout=10,
            what="the metric",
        )
        assert list(JobLog.objects.filter(job=job).values_list("line", flat=True)) == [
            "Training on 40 rows."
        ]

        answer = client_for(owner).get(f"/api/v1/orgs/{org.slug}/jobs/{job.pk}/")
        assert answer.status_code == 200
        assert answer.json()["progress"] == {"step": 3, "total": 10, "epoch": 2}
        listed = client_for(owner).get(f"/api/v1/orgs/{org.slug}/jobs/")
        assert [row["progress"] for row in listed.json()["results"]] == [
            {"step": 3, "total": 10, "epoch": 2}
        ]
        client.force_login(owner)
        page = client.get(reverse("jobs:job", args=[org.slug, job.pk]))
        assert "Epoch 2, step 3 of 10 (30%)" in page.content.decode()
        assert not outcome, "the child was held, so its attempt cannot have ended"
    finally:
        release.touch()
        runner.join(timeout=60)
    assert outcome == ["failed"]


# A child started cold whose imports take as long as the test likes: it says it is importing,
# says READY (in prepare) only once released, and then fails.
SLOW_IMPORTS = r"""
import json, sys, time
from pathlib import Path

plan = json.loads(sys.argv[1])
Path(plan["importing"]).touch()
release = Path(plan["release"])
while not release.exists():
    time.sleep(0.01)
from jobs.runner.child import prepare

prepare([])
sys.exit(1)
"""


@e2e
@pytest.mark.slow
def test_a_child_started_cold_keeps_its_attempts_lease_while_it_imports(attempt_running, tmp_path):
    """No zygote, so the child starts cold; until it says READY the runner reports as it does
    once the child runs, so a machine slow to import loses no job to its own lease."""
    importing, release = tmp_path / "importing", tmp_path / "release"
    job, runner, outcome = attempt_running(
        SLOW_IMPORTS, {"importing": str(importing), "release": str(release)}
    )

    def lease():
        return Job.objects.get(pk=job.pk).lease_expires_at

    try:
        wait_for(importing.exists, timeout=30, what="the child to start importing")
        first = lease()
        wait_for(
            lambda: lease() > first,
            timeout=10,
            what="the lease to be renewed while the child is still importing",
        )
        assert not outcome, "the child was held before READY, so its attempt cannot have ended"
    finally:
        release.touch()
        runner.join(timeout=60)
    assert outcome == ["failed"]


@pytest.mark.parametrize(
    ("kind", "progress", "words"),
    [
        (Job.Kind.TRAIN, None, ""),
        (Job.Kind.TRAIN, {"step": 120, "total": 400, "epoch": 3}, "Epoch 3, step 120 of 400 (30%)"),
        (Job.Kind.TRAIN, {"step": 7, "total": None, "epoch": 1}, "Epoch 1, step 7"),
        (
            Job.Kind.INFER,
            {"step": 1200, "total": 5000, "epoch": 1},
            "1,200 of 5,000 rows predicted (24%)",
        ),
        (Job.Kind.INFER, {"step": 1200, "total": None, "epoch": 1}, "1,200 rows predicted"),
    ],
)
def test_progress_reads_as_words(kind, progress, words):
    assert Job(kind=kind, progress=progress).progress_text == words
