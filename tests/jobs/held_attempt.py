"""An attempt run by the real runner (run_attempt) on a thread, its child started cold as a
script the test writes, so that the test can watch the attempt while the child holds."""

from __future__ import annotations

import functools
import json
import sys
import threading
from pathlib import Path

from django.db import connection

from jobs.models import Job, Worker
from jobs.runner import parent
from jobs.runner.isolation import child_start
from jobs.runner.parent import run_attempt
from registry.models import DatasetVersion
from registry.services import dataset_create, dataset_version_create
from tenants.actors import Actor
from tests.jobs.test_pool_e2e import _separable_csv


def points_version(org, owner, tmp_path: Path, *, rows: int = 20) -> DatasetVersion:
    """A CSV dataset version of `org` (tmp_path/points.csv, two separable classes), for a job to
    download."""
    data = tmp_path / "points.csv"
    data.write_bytes(_separable_csv(rows))
    actor = Actor(user=owner)
    return dataset_version_create(
        dataset=dataset_create(organization=org, name="points", actor=actor),
        path=data,
        filename="points.csv",
        actor=actor,
    )


def attempt_start(
    job: Job, worker: Worker, script: str, plan: dict, monkeypatch
) -> tuple[threading.Thread, list[str]]:
    """Run attempt 1 of `job` on `worker` on a thread, its child `python -c script` with `plan`
    (as JSON) as its argument; returns the thread and the list its outcome is added to."""
    monkeypatch.setattr(
        parent,
        "child_start",
        functools.partial(child_start, command=(sys.executable, "-c", script, json.dumps(plan))),
    )
    outcome: list[str] = []

    def run() -> None:
        try:
            outcome.append(run_attempt(job_id=job.pk, attempt=1, worker_id=worker.pk))
        finally:
            connection.close()  # this thread's

    runner = threading.Thread(target=run)
    runner.start()
    return runner, outcome
