"""Runtimes: probing a worker's configured interpreters, recording the reports at registration,
and placing jobs that need one only where it works (real database, real subprocesses)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from django.conf import settings

from jobs.models import Job, JobState, Runtime, WorkerRuntime
from jobs.runtimes import RuntimeReport, runtime_probe, runtimes_configured, runtimes_probe
from jobs.scheduler.apply import scheduler_pass
from jobs.services.pool import worker_register
from tests.factories import JobFactory

TORCH = "torch-2.13-py311"
SELF = str(Path(sys.executable).absolute())


def _script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


# Probing (no database)


@pytest.mark.slow
def test_probe_reads_the_interpreters_python_and_packages():
    report = runtime_probe(TORCH, SELF)
    assert report.error == ""
    assert report.python_version == ".".join(map(str, sys.version_info[:3]))
    # The worker's own environment: the training stack pyproject pins.
    assert report.packages["torch"].startswith("2.13.0")
    assert {"numpy", "pyarrow", "safetensors"} <= set(report.packages)


@pytest.mark.slow
def test_probe_ignores_the_workers_pythonpath(tmp_path, monkeypatch):
    # -I: what the runtime itself has installed, not what the worker's environment adds.
    fake = tmp_path / "fake-1.0.dist-info"
    fake.mkdir()
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: fake\nVersion: 1.0\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert "fake" not in runtime_probe(TORCH, SELF).packages


@pytest.mark.parametrize(
    ("interpreter", "words"),
    [
        ("/nonexistent/bin/python", "cannot run: No such file or directory"),
        ("", "no interpreter given"),
        ("bin/python", "is not an absolute path"),
    ],
)
@pytest.mark.slow
def test_a_runtime_that_cannot_start_is_reported_broken_with_why(interpreter, words):
    report = runtime_probe("broken-1", interpreter)
    assert words in report.error
    assert report.packages == {} and report.python_version == ""


@pytest.mark.slow
def test_a_runtime_that_fails_reports_its_error_output(tmp_path):
    crash = _script(tmp_path, "python", "echo 'ImportError: libpython3.11.so' >&2; exit 3")
    report = runtime_probe("broken-1", crash)
    assert report.error == "its interpreter exited with status 3: ImportError: libpython3.11.so"


@pytest.mark.slow
def test_a_runtime_that_answers_nonsense_is_broken(tmp_path):
    report = runtime_probe("odd-1", _script(tmp_path, "python", "echo hello"))
    assert report.error == "its interpreter printed no report of its packages"


@pytest.mark.slow
def test_a_runtime_that_hangs_is_given_up_after_the_timeout(tmp_path):
    hangs = _script(tmp_path, "python", "exec sleep 60")
    report = runtime_probe("hangs-1", hangs, timeout_s=0.5)
    assert report.error == "its interpreter did not answer within 0.5 s"


def test_configured_runtimes_parse_name_equals_path_and_skip_nameless_entries():
    entries = [f" {TORCH} = {SELF} ", "no-path", "=/usr/bin/python3", "bad name=/x", "a/b=/x"]
    assert runtimes_configured(entries) == [(TORCH, SELF), ("no-path", "")]


@pytest.mark.slow
def test_the_test_settings_offer_the_default_runtime_as_this_interpreter():
    assert runtimes_configured() == [(settings.DEFAULT_RUNTIME, SELF)]
    assert [r.name for r in runtimes_probe() if not r.error] == [TORCH]


# Registration


def _report(name, error="", **packages):
    return RuntimeReport(
        name=name,
        interpreter=f"/opt/runtimes/{name}/bin/python",
        python_version="" if error else "3.11.7",
        packages={} if error else packages,
        error=error,
    )


@pytest.mark.django_db
def test_registration_records_working_and_broken_runtimes():
    worker = worker_register(
        name="w1",
        devices=[],
        runtimes=[_report(TORCH, torch="2.13.0", numpy="2.4.6"), _report("old-1", error="gone")],
    )
    torch = Runtime.objects.get(name=TORCH)
    assert torch.python_version == "3.11.7"
    assert torch.packages == {"numpy": "2.4.6", "torch": "2.13.0"}
    reports = {r.runtime.name: r for r in WorkerRuntime.objects.filter(worker=worker)}
    assert reports[TORCH].error == "" and reports["old-1"].error == "gone"
    assert Runtime.objects.get(name="old-1").packages == {}


@pytest.mark.django_db
def test_registering_again_replaces_the_workers_runtimes_but_keeps_the_rows():
    worker = worker_register(name="w1", devices=[], runtimes=[_report(TORCH, torch="2.13.0")])
    worker_register(name="w1", devices=[], runtimes=[_report("jax-0.6-py312", jax="0.6.0")])
    assert list(
        WorkerRuntime.objects.filter(worker=worker).values_list("runtime__name", flat=True)
    ) == ["jax-0.6-py312"]
    assert Runtime.objects.filter(name=TORCH).exists()


@pytest.mark.django_db
def test_a_broken_report_keeps_the_packages_a_healthy_one_found():
    worker_register(name="w1", devices=[], runtimes=[_report(TORCH, torch="2.13.0")])
    worker_register(name="w2", devices=[], runtimes=[_report(TORCH, error="exited with status 1")])
    assert Runtime.objects.get(name=TORCH).packages == {"torch": "2.13.0"}


# Placement


def _place(*jobs: Job) -> list[Job]:
    scheduler_pass()
    for job in jobs:
        job.refresh_from_db()
    return list(jobs)


@pytest.mark.django_db
def test_a_job_needing_a_runtime_goes_to_the_worker_that_has_it(org):
    worker_register(name="plain", devices=[])
    has_it = worker_register(name="has-it", devices=[], runtimes=[_report(TORCH, torch="2.13.0")])
    (job,) = _place(JobFactory(organization=org, runtime=TORCH))
    assert job.state == JobState.SCHEDULED and job.worker == has_it


@pytest.mark.django_db
def test_a_job_whose_runtime_no_worker_has_stays_queued_and_says_so(org):
    worker_register(name="plain", devices=[])
    worker_register(name="broken", devices=[], runtimes=[_report(TORCH, error="gone")])
    recipe_job, job = JobFactory(organization=org), JobFactory(organization=org, runtime=TORCH)
    recipe_job, job = _place(recipe_job, job)
    assert recipe_job.state == JobState.SCHEDULED
    assert job.state == JobState.QUEUED
    assert job.waiting_reason == f"no cpu worker has runtime {TORCH}"
    # Once a worker offers it, the next pass places the job there.
    worker = worker_register(name="new", devices=[], runtimes=[_report(TORCH, torch="2.13.0")])
    (job,) = _place(job)
    assert job.state == JobState.SCHEDULED and job.worker == worker
