"""Runtimes reported by real `run_worker` processes: the default one (the worker's own
interpreter, as `make worker` offers it) and broken ones, which never stop the worker."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from django.conf import settings

from jobs.models import JobState, Runtime, Worker, WorkerRuntime
from tests.factories import JobFactory
from tests.processes import wait_for

e2e = pytest.mark.django_db(transaction=True)


def _reports(name: str) -> dict[str, WorkerRuntime]:
    return {
        r.runtime.name: r
        for r in WorkerRuntime.objects.filter(worker__name=name).select_related("runtime")
    }


@e2e
def test_workers_report_the_default_runtime_and_keep_running_with_broken_ones(pool, org, tmp_path):
    hangs = tmp_path / "hangs" / "python"
    hangs.parent.mkdir()
    hangs.write_text("#!/bin/sh\nexec sleep 60\n")
    hangs.chmod(0o755)
    plain = pool.start_worker("w1")
    odd = pool.start_worker(
        "w2",
        env={
            "WORKER_RUNTIMES": f"gone-1=/nonexistent/bin/python,hangs-1={hangs}",
            "WORKER_RUNTIME_PROBE_TIMEOUT_S": "1",
        },
    )

    # The default runtime, probed by the real process from its own interpreter.
    default = _reports(plain)[settings.DEFAULT_RUNTIME]
    assert default.error == "" and default.interpreter == str(Path(sys.executable).absolute())
    runtime = Runtime.objects.get(name=settings.DEFAULT_RUNTIME)
    assert runtime.python_version == ".".join(map(str, sys.version_info[:3]))
    assert runtime.packages["torch"].startswith("2.13.0")

    # The broken ones are reported with why, and the worker goes on heartbeating.
    broken = _reports(odd)
    assert set(broken) == {"gone-1", "hangs-1"}
    assert "No such file or directory" in broken["gone-1"].error
    assert broken["hangs-1"].error == "its interpreter did not answer within 1 s"
    registered = Worker.objects.get(name=odd).last_heartbeat_at
    wait_for(
        lambda: Worker.objects.get(name=odd).last_heartbeat_at > registered,
        timeout=20,
        what=f"{odd} to heartbeat after reporting broken runtimes",
    )
    assert pool.processes["w2"].poll() is None

    # A job that needs a runtime no worker has working waits, and says why, in the real tick.
    job = JobFactory(organization=org, runtime="hangs-1")

    def waiting() -> str:
        job.refresh_from_db()
        return job.waiting_reason

    wait_for(waiting, timeout=20, what="the scheduler to explain the wait")
    assert job.state == JobState.QUEUED
    assert job.waiting_reason == "no cpu worker has runtime hangs-1"
