"""Utilization sampling: a real job's process tree read from /proc as it runs (CPU cores and
resident memory, a grandchild's included), GPUs through NVML replaced at its edge, the stored
series bounded, and NVML's failures never failing a job."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import types
import uuid
from pathlib import Path

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from jobs.models import Job, JobAttempt, Quota, ResourceClass, UtilizationSample
from jobs.runner.sampler import Sampler, tree_usage
from jobs.scheduler.apply import scheduler_pass
from jobs.services.attempts import Report, attempt_report
from jobs.services.pool import worker_register
from tests.factories import JobFactory
from tests.jobs.held_attempt import attempt_start, points_version
from tests.processes import wait_for

REPO = Path(__file__).resolve().parents[2]
e2e = pytest.mark.django_db(transaction=True)
MIB = 2**20
HELD_MIB = 96

# A grandchild that holds HELD_MIB of memory and burns a core, under a child that waits for it:
# the attempt's figures count the whole tree, as they must for a sandbox's processes.
BURNER = rf"""
import sys, time
from pathlib import Path

held = b"\x01" * ({HELD_MIB} * 2**20)
release = Path(sys.argv[1])
while not release.exists():
    sum(range(20_000))
"""
HELD = r"""
import json, subprocess, sys

from jobs.runner.child import prepare

plan = json.loads(sys.argv[1])
prepare([])
print("burning", flush=True)
subprocess.run([sys.executable, "-c", plan["burner"], plan["release"]], check=True)
sys.exit(1)
"""


def _run_held(job, worker, release: Path, monkeypatch) -> tuple[threading.Thread, list]:
    return attempt_start(
        job, worker, HELD, {"burner": BURNER, "release": str(release)}, monkeypatch
    )


@e2e
@pytest.mark.slow
def test_a_real_cpu_job_stores_its_process_trees_cpu_and_memory(
    local_storage, org, owner, tmp_path, settings, monkeypatch
):
    settings.WORKER_WORKDIR = str(tmp_path / "work")
    settings.UTILIZATION_SAMPLE_S = 0.2
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the child starts in /
    worker = worker_register(name=f"cpu-{uuid.uuid4().hex[:6]}", devices=[])
    version = points_version(org, owner, tmp_path)
    job = JobFactory(organization=org, input_dataset_version=version, created_by=owner)
    scheduler_pass()
    release = tmp_path / "release"
    runner, outcome = _run_held(job, worker, release, monkeypatch)
    try:
        wait_for(
            lambda: (
                (
                    not outcome
                    and UtilizationSample.objects.filter(
                        job=job, memory_bytes__gt=HELD_MIB * MIB, cpu_cores__gt=0.3
                    ).count()
                    >= 3
                )
                or outcome
            ),
            timeout=60,
            what="three samples of the burning grandchild",
        )
        assert not outcome, "the attempt ended before it was sampled"
    finally:
        release.touch()
        runner.join(timeout=60)
    assert outcome == ["failed"]  # the held child exits 1 once released
    samples = list(UtilizationSample.objects.filter(job=job))
    assert {s.organization_id for s in samples} == {org.pk}
    assert {s.attempt for s in samples} == {1}
    assert all(s.gpu_utilization is None and s.gpu_memory_bytes is None for s in samples)
    # One busy grandchild: about a core, never much more than the machine has.
    assert max(s.cpu_cores for s in samples) <= 1.5
    summary = JobAttempt.objects.get(job=job, number=1).utilization
    assert summary["samples"] == len(samples)
    assert summary["memory_bytes_peak"] > HELD_MIB * MIB
    assert 0 < summary["cpu_cores_avg"] <= summary["cpu_cores_peak"]
    assert summary["gpu_samples"] == 0 and summary["gpu_utilization_avg"] is None
    assert Job.objects.get(pk=job.pk).utilization == summary


@e2e
@pytest.mark.parametrize("nvml", ["answers", "fails"])
@pytest.mark.slow
def test_a_gpu_job_through_the_runner_reads_nvml_at_its_edge_and_runs_on_when_it_fails(
    local_storage, org, owner, tmp_path, settings, monkeypatch, nvml
):
    settings.WORKER_WORKDIR = str(tmp_path / "work")
    settings.UTILIZATION_SAMPLE_S = 0.2
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    fake = FakeNvml({0: (22.0, 9 * GB, 80 * GB)})
    fake.fail_reads = nvml == "fails"
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    h100 = ResourceClass.objects.get(name="h100-80gb")
    Quota.objects.create(organization=org, resource_class=h100, limit_gpus=1)
    worker = worker_register(
        name=f"h100-{uuid.uuid4().hex[:6]}", devices=[{"name": "NVIDIA H100 80GB HBM3"}]
    )
    job = JobFactory(
        organization=org,
        input_dataset_version=points_version(org, owner, tmp_path),
        resource_class=h100,
    )
    scheduler_pass()
    release = tmp_path / "release"
    runner, outcome = _run_held(job, worker, release, monkeypatch)
    try:
        wait_for(
            lambda: (
                outcome
                or UtilizationSample.objects.filter(
                    job=job, memory_bytes__gt=HELD_MIB * MIB
                ).count()
                >= 3
            ),
            timeout=60,
            what="three samples of the grandchild",
        )
        assert not outcome, "the attempt ended before it was sampled"
    finally:
        release.touch()
        runner.join(timeout=60)
    assert outcome == ["failed"]  # the held child's own exit 1, nothing of NVML's
    assert "NVML" not in Job.objects.get(pk=job.pk).failure_reason
    samples = list(UtilizationSample.objects.filter(job=job))
    if nvml == "answers":
        assert {(s.gpu_utilization, s.gpu_memory_bytes) for s in samples} == {(22.0, 9 * GB)}
        assert Job.objects.get(pk=job.pk).utilization["gpu_memory_total_bytes"] == 80 * GB
    else:
        assert {(s.gpu_utilization, s.gpu_memory_bytes) for s in samples} == {(None, None)}


@pytest.mark.slow
def test_tree_usage_counts_a_grandchild_and_ends_with_its_root(tmp_path):
    release = tmp_path / "release"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys; subprocess.run(sys.argv[1:])",
            *(sys.executable, "-c", BURNER, str(release)),
        ]
    )
    try:
        wait_for(
            lambda: (usage := tree_usage(child.pid)) and usage[1] > HELD_MIB * MIB,
            timeout=30,
            what="the grandchild's memory counted",
        )
    finally:
        release.touch()
        child.wait(timeout=30)
    assert tree_usage(child.pid) is None


class FakeNvml(types.ModuleType):
    """pynvml's calls the edge makes, answering known numbers per device index."""

    class NVMLError(Exception):
        pass

    def __init__(self, readings: dict[int, tuple[float, int, int]], *, fail_init=False):
        super().__init__("pynvml")
        self.readings, self.fail_init, self.fail_reads = readings, fail_init, False
        self.shut = False

    def nvmlInit(self):
        if self.fail_init:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlShutdown(self):
        self.shut = True

    def nvmlDeviceGetHandleByIndex(self, index):
        if self.fail_reads:
            raise self.NVMLError("GPU is lost")
        return index

    def nvmlDeviceGetUtilizationRates(self, handle):
        return types.SimpleNamespace(gpu=self.readings[handle][0], memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle):
        _, used, total = self.readings[handle]
        return types.SimpleNamespace(used=used, total=total, free=total - used)


GB = 1024**3


def test_gpu_samples_read_the_allocated_devices_through_nvml(monkeypatch):
    fake = FakeNvml({2: (20.0, 9 * GB, 80 * GB), 3: (30.0, 7 * GB, 80 * GB), 0: (99.0, 1, 1)})
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    sampler = Sampler(root_pid=os.getpid(), gpu_indices=[2, 3], interval=0.01, max_samples=100)
    sampler.take(sampler.due)
    sampler.close()
    [sample], thin = sampler.drain()
    assert not thin
    assert sample.gpu_utilization == 25.0  # the two GPUs' mean
    assert sample.gpu_memory_bytes == 9 * GB  # the fullest one's
    assert sample.gpu_memory_total_bytes == 80 * GB
    assert fake.shut


@pytest.mark.parametrize("where", ["init", "read", "missing"])
def test_nvml_failing_leaves_cpu_and_memory_sampled(monkeypatch, caplog, where):
    if where == "missing":
        monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    else:
        fake = FakeNvml({0: (50.0, GB, 24 * GB)}, fail_init=where == "init")
        fake.fail_reads = where == "read"
        monkeypatch.setitem(sys.modules, "pynvml", fake)
    sampler = Sampler(root_pid=os.getpid(), gpu_indices=[0], interval=0.01, max_samples=100)
    for _ in range(2):
        sampler.take(sampler.due)
    samples, _ = sampler.drain()
    assert len(samples) == 2
    assert all(s.gpu_utilization is None for s in samples)
    assert all(s.memory_bytes > 0 for s in samples)
    assert "GPU utilization is" in caplog.text
    assert caplog.text.count("GPU utilization is") == 1  # said once, not per sample


def test_a_reading_failing_unforeseen_stops_sampling_not_the_job(monkeypatch, caplog):
    sampler = Sampler(root_pid=os.getpid(), gpu_indices=[], interval=0.01, max_samples=100)
    sampler.take(sampler.due)

    def broken(pid):
        raise RuntimeError("a /proc unlike any other")

    monkeypatch.setattr("jobs.runner.sampler.tree_usage", broken)
    for _ in range(3):
        sampler.take(sampler.due)  # raises nothing
    assert len(sampler.drain()[0]) == 1
    assert caplog.text.count("utilization sampling stopped") == 1


@pytest.mark.django_db
def test_a_gpu_attempts_samples_are_stored_thinned_and_summarized(org, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml({0: (22.0, 9 * GB, 80 * GB)}))
    job = JobFactory(
        organization=org, state=Job.State.RUNNING, attempt=1, resource_class_id=_class("h100-80gb")
    )
    JobAttempt.objects.create(organization=org, job=job, number=1)
    sampler = Sampler(root_pid=os.getpid(), gpu_indices=[0], interval=0.01, max_samples=4)
    thinned = []
    for _ in range(3):
        for _ in range(3):
            sampler.take(sampler.due)
        samples, thin = sampler.drain()
        thinned.append(thin)
        with CaptureQueriesContext(connection) as queries:
            attempt_report(
                job_id=job.pk,
                attempt=1,
                report=Report(logs=[], metrics=[], samples=samples, thin_samples=thin),
            )
        # The lease and the summary ride in one update of the job's row.
        job_updates = [q for q in queries if q["sql"].startswith('UPDATE "jobs_job"')]
        assert len(job_updates) == 1 and '"utilization"' in job_updates[0]["sql"]
        assert UtilizationSample.objects.filter(job=job).count() == sampler.stored
    assert thinned == [False, True, True]  # 3 stored; 6 -> 3; 6 -> 3
    assert sampler.interval == pytest.approx(0.04)  # twice as sparse after each thinning
    summary = Job.objects.get(pk=job.pk).utilization
    assert summary["samples"] == 9 and summary["gpu_samples"] == 9
    assert summary["gpu_utilization_avg"] == 22.0
    assert summary["gpu_memory_bytes_peak"] == 9 * GB
    assert summary["gpu_memory_total_bytes"] == 80 * GB


def _sampled_gpu_job(org, *, peak_gb: float, utilization: float, samples=8, gpu_count=1):
    """A running H100 job whose attempt reported `samples` readings of a fake NVML."""
    fake = FakeNvml({i: (utilization, int(peak_gb * GB), 80 * GB) for i in range(gpu_count)})
    sys.modules["pynvml"] = fake
    try:
        # A minute a sample: a run long enough to cost cents (sampled at once, not waited for).
        sampler = Sampler(
            root_pid=os.getpid(), gpu_indices=list(range(gpu_count)), interval=60, max_samples=50
        )
        for _ in range(samples):
            sampler.take(sampler.due)
    finally:
        del sys.modules["pynvml"]
    job = JobFactory(
        organization=org,
        state=Job.State.RUNNING,
        attempt=1,
        gpu_count=gpu_count,
        resource_class_id=_class("h100-80gb"),
    )
    JobAttempt.objects.create(organization=org, job=job, number=1)
    samples, _ = sampler.drain()
    attempt_report(job_id=job.pk, attempt=1, report=Report(logs=[], metrics=[], samples=samples))
    job.refresh_from_db()
    return job


@pytest.mark.django_db
def test_the_job_page_draws_the_utilization_and_says_the_priced_hint(org, owner, client):
    job = _sampled_gpu_job(org, peak_gb=9.1, utilization=22)
    client.force_login(owner)
    page = client.get(reverse("jobs:job", args=[org.slug, job.pk])).content.decode()
    section = page[page.index('id="utilization"') :]
    for name in ("CPU cores used", "Memory", "GPU utilization", "GPU memory"):
        assert f'aria-label="{name} in' in section
    assert "<title>GPU utilization at" in section and ": 22 %</title>" in section
    hint = section[section.index('id="rightsizing-hint"') :]
    assert "Peak GPU memory 9.1 GB of 80.0 GB, utilization 22%" in hint
    assert "on 1 l4 would cost about 83% less" in hint

    listed = client.get(reverse("jobs:jobs", args=[org.slug])).content.decode()
    assert "GPU 22%, 9.1\xa0GB peak" in listed


@pytest.mark.django_db
def test_the_api_gives_the_summary_on_the_list_and_the_hint_on_one_job(org, owner, client_for):
    job = _sampled_gpu_job(org, peak_gb=30, utilization=60, gpu_count=2)
    api = client_for(owner)
    one = api.get(f"/api/v1/orgs/{org.slug}/jobs/{job.pk}/").json()
    assert one["utilization"]["gpu_samples"] == 8
    assert one["utilization"]["gpu_utilization_avg"] == 60.0
    assert one["utilization"]["gpu_memory_bytes_peak"] == 30 * GB
    assert one["rightsizing_hint"]["resource_class"] == "a100-40gb"  # 36 GB fits 40, not 24
    assert one["rightsizing_hint"]["saving_percent"] == 33
    assert "on 2 a100-40gb" in one["rightsizing_hint"]["text"]
    [row] = api.get(f"/api/v1/orgs/{org.slug}/jobs/").json()["results"]
    assert row["utilization"] == one["utilization"]
    assert "rightsizing_hint" not in row  # priced for one job only
    series = api.get(f"/api/v1/orgs/{org.slug}/jobs/{job.pk}/utilization/").json()
    assert len(series) == 8
    assert {(p["attempt"], p["gpu_utilization"], p["gpu_memory_bytes"]) for p in series} == {
        (1, 60.0, 30 * GB)
    }
    assert all(p["memory_bytes"] > 0 and p["seconds"] > 0 for p in series)


@pytest.mark.django_db
def test_a_cpu_job_has_no_hint_and_a_job_not_yet_sampled_no_summary(org, owner, client_for):
    job = JobFactory(organization=org)
    api = client_for(owner)
    one = api.get(f"/api/v1/orgs/{org.slug}/jobs/{job.pk}/").json()
    assert one["utilization"] is None and one["rightsizing_hint"] is None


@pytest.mark.django_db
def test_samples_of_another_organization_are_not_drawn(org, owner, client):
    job = _sampled_gpu_job(org, peak_gb=9, utilization=20)
    # Rows filed under another organization, though they name this job: never read for it.
    UtilizationSample.objects.filter(job=job).update(organization=JobFactory().organization)
    client.force_login(owner)
    page = client.get(reverse("jobs:job", args=[org.slug, job.pk])).content.decode()
    assert 'aria-label="CPU cores used in' not in page


def _class(name: str) -> int:
    from jobs.models import ResourceClass

    return ResourceClass.objects.get(name=name).pk
