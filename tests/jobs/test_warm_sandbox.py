"""The own-code sandbox a worker keeps warm: a package job runs in a sandbox started before it,
with the results a cold one gets; nothing a package leaves in its sandbox (a module global, an
environment variable, files in its work folder, /tmp or HOME) reaches the next package, of
another tenant; jobs that do not fit it (another runtime, a GPU, a replica) and a job whose
warm sandbox died while waiting start cold and succeed."""

from __future__ import annotations

import functools
import json
import os
import stat
from pathlib import Path

import pytest

from jobs.models import Job, JobLog, JobMetric, JobState
from jobs.runner import parent, warm
from jobs.runner.code import WarmSandbox
from jobs.runner.isolation import child_threads
from jobs.runner.parent import run_attempt
from jobs.runner.sandbox import python_runtime
from jobs.runtimes import RuntimeReport
from jobs.scheduler.apply import scheduler_pass
from jobs.services.pool import worker_register
from registry.models import ModelVersion
from tests.jobs import code_helpers
from tests.jobs.code_helpers import RUNTIME, finished, runtime_python
from tests.jobs.idle_child import IDLE_ZYGOTE_COMMAND
from tests.jobs.test_code_jobs import TRAINER, _submit, _upload
from tests.processes import wait_for

REPO = Path(__file__).resolve().parents[2]

OTHER_RUNTIME = "plain-py"
FOUND = "found "
# Reports what an earlier job left, then leaves all of it for the next one.
LEAKY = """
import json, os, sys, tempfile
import factory_job

def run():
    home = os.path.expanduser("~")
    found = {
        "global": getattr(factory_job, "LEFT", None) or getattr(json, "LEFT", None),
        "environ": os.environ.get("LEFT_BY_A_JOB"),
        "modules": sorted(name for name in sys.modules if name.startswith("leftover")),
        "folder": sorted(name for name in os.listdir("/job") if name.startswith("left")),
        "tmp": sorted(n for n in os.listdir(tempfile.gettempdir()) if n.startswith("left")),
        "home": sorted(name for name in os.listdir(home) if name.startswith(".left")),
    }
    print("found " + json.dumps(found))
    factory_job.LEFT = json.LEFT = "a secret"
    os.environ["LEFT_BY_A_JOB"] = "a secret"
    sys.modules["leftover"] = sys
    for path in ("/job/left.txt", os.path.join(tempfile.gettempdir(), "left.txt"),
                 os.path.join(home, ".left")):
        with open(path, "w") as f:
            f.write("a secret")
    factory_job.log(step=1, loss=1.0)
    with open("/job/output/rows.csv", "w") as f:
        f.write("x,y\\n1,2\\n")
    factory_job.register_dataset("/job/output/rows.csv")
"""
NOTHING = {"global": None, "environ": None, "modules": [], "folder": [], "tmp": [], "home": []}


@pytest.fixture
def sandbox_work_root(settings):
    """WORKER_WORKDIR for an in-process worker running sandboxes."""
    with code_helpers.sandbox_work_root() as work:
        settings.WORKER_WORKDIR = str(work)
        yield work


@pytest.fixture
def worker(settings, sandbox_work_root, monkeypatch):
    """A CPU worker offering two runtimes, whose attempts, run in this process, take the
    sandboxes it starts ahead for the first; its recipe warm children are a stand-in that only
    waits (no recipe runs here)."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the zygote starts in /
    monkeypatch.setattr(warm, "ZYGOTE_COMMAND", IDLE_ZYGOTE_COMMAND)
    interpreter = runtime_python()
    other = os.path.realpath(interpreter)
    if other == interpreter:
        other = os.path.join(os.path.dirname(other), ".", os.path.basename(other))
    reports = [
        RuntimeReport(name=RUNTIME, interpreter=interpreter, python_version="3"),
        RuntimeReport(name=OTHER_RUNTIME, interpreter=other, python_version="3"),
    ]
    worker = worker_register(name=f"cpu-{os.urandom(3).hex()}", devices=[], runtimes=reports)
    threads = child_threads(worker.slots)
    warm.warm_children_keep(
        threads=threads,
        sandbox=functools.partial(
            WarmSandbox,
            runtime=python_runtime(interpreter),
            root=sandbox_work_root,
            threads=threads,
        ),
    )
    yield worker
    warm.warm_children_stop()


@pytest.fixture
def handed_over(monkeypatch):
    """The warm sandboxes that were handed a job, in order."""
    went: list[WarmSandbox] = []
    real_go = WarmSandbox.go

    def go(self, **kwargs):
        went.append(self)
        return real_go(self, **kwargs)

    monkeypatch.setattr(WarmSandbox, "go", go)
    return went


def _run(job: Job, worker) -> Job:
    scheduler_pass()
    job.refresh_from_db()
    outcome = run_attempt(job_id=job.pk, attempt=job.attempt, worker_id=worker.pk)
    job.refresh_from_db()
    assert outcome == "succeeded", job.failure_reason
    return job


def _outcome(job: Job) -> tuple:
    model = ModelVersion.objects.get(pk=job.output_model_version_id)
    return (
        list(JobMetric.objects.filter(job=job).order_by("step").values_list("step", "value")),
        list(JobLog.objects.filter(job=job).values_list("line", flat=True)),
        model.metrics,
        model.parameters,
    )


@pytest.mark.django_db
@pytest.mark.slow
def test_a_package_runs_in_the_sandbox_started_ahead_with_the_results_of_a_cold_one(
    worker, handed_over, org, owner, local_store, sandbox_work_root
):
    waiting = warm._sandbox
    assert waiting is not None and waiting.alive()
    # Private to the worker until its job: a folder of the slot's own, made for this sandbox.
    assert stat.S_IMODE(waiting.work.stat().st_mode) == 0o700
    assert waiting.work.parent == sandbox_work_root and not list(waiting.code.iterdir())
    version = _upload(org, owner, local_store.parent, "tiny", TRAINER)

    warmed = _run(_submit(org, owner, version, {"steps": 3, "lr": 0.5}), worker)

    assert handed_over == [waiting] and not waiting.alive(), "one job per sandbox"
    assert warm._sandbox is not None and warm._sandbox is not waiting, "a fresh one waits"
    assert not waiting.work.exists() and not waiting.code.exists()
    warm.warm_children_stop()  # from here on, attempts start their sandbox cold
    cold = _run(_submit(org, owner, version, {"steps": 3, "lr": 0.5}), worker)
    assert handed_over == [waiting]
    assert _outcome(warmed) == _outcome(cold)
    assert _outcome(warmed)[0] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert not list(sandbox_work_root.iterdir())  # every folder removed


@pytest.mark.django_db
@pytest.mark.slow
def test_the_next_package_of_another_tenant_finds_nothing_the_first_left_in_its_sandbox(
    worker, handed_over, org, owner, other_org, member_factory, local_store
):
    other_owner = member_factory(other_org, "owner")
    jobs = [
        _submit(
            who[0],
            who[1],
            _upload(*who, local_store.parent, "leaky", LEAKY, outputs="dataset = true"),
            {"steps": 1},
        )
        for who in ((org, owner), (other_org, other_owner))
    ]
    for job in jobs:
        job = _run(job, worker)
        line = JobLog.objects.get(job=job, line__startswith=FOUND).line
        assert json.loads(line.removeprefix(FOUND)) == NOTHING
    assert len(handed_over) == 2 and handed_over[0] is not handed_over[1]


@pytest.mark.django_db
@pytest.mark.slow
def test_jobs_that_do_not_fit_the_sandbox_started_ahead_start_cold_and_it_waits_on(
    worker, handed_over, org, owner, local_store
):
    version = _upload(org, owner, local_store.parent, "tiny", TRAINER)
    waiting = warm._sandbox
    other = _submit(org, owner, version, {"steps": 1})
    Job.objects.filter(pk=other.pk).update(runtime=OTHER_RUNTIME)

    assert _run(other, worker).state == JobState.SUCCEEDED

    assert handed_over == [] and warm._sandbox is waiting and waiting.alive()
    runtime = waiting.runtime
    assert waiting.fits(runtime=runtime, threads=waiting.threads, gpus=False, serving=False)
    assert not waiting.fits(runtime=runtime, threads=waiting.threads, gpus=True, serving=False)
    assert not waiting.fits(runtime=runtime, threads=waiting.threads, gpus=False, serving=True)
    assert not waiting.fits(runtime=runtime, threads=waiting.threads + 1, gpus=False, serving=False)
    # What a GPU job's attempt asks: no, and the sandbox waits on for a job that fits.
    taken = warm.warm_sandbox_take(
        lambda sandbox: sandbox.fits(
            runtime=runtime, threads=sandbox.threads, gpus=True, serving=False
        )
    )
    assert taken is None and warm._sandbox is waiting


@pytest.mark.django_db
@pytest.mark.slow
def test_a_sandbox_that_died_while_waiting_is_replaced_and_the_job_starts_cold(
    worker, handed_over, org, owner, local_store
):
    dead = warm._sandbox
    dead.process.kill()
    dead.process.wait()
    version = _upload(org, owner, local_store.parent, "tiny", TRAINER)

    job = _run(_submit(org, owner, version, {"steps": 2}), worker)

    assert job.state == JobState.SUCCEEDED and handed_over == []
    assert not dead.work.exists(), "its folders went with it"
    assert warm._sandbox is not None and warm._sandbox is not dead and warm._sandbox.alive()


def _staged(work_root) -> set[str]:
    """The work folders of the sandboxes started ahead (each has a code folder beside it)."""
    return {
        path.name
        for path in work_root.iterdir()
        if path.name.startswith("staged-") and "-code-" not in path.name
    }


@pytest.mark.django_db(transaction=True)
def test_a_pool_worker_keeps_a_sandbox_ahead_and_runs_the_next_package_in_it(
    sandboxed_pool, org, owner, tmp_path
):
    work_root = Path(sandboxed_pool.env["WORKER_WORKDIR"])
    sandboxed_pool.start_worker("w1")
    # One per pool process (a slot each).
    ahead = wait_for(lambda: _staged(work_root), timeout=60, what="sandboxes started ahead")
    version = _upload(org, owner, tmp_path, "tiny", TRAINER)

    job = finished(_submit(org, owner, version, {"steps": 3, "lr": 0.5}), sandboxed_pool)

    assert job.state == JobState.SUCCEEDED, job.failure_reason
    assert JobMetric.objects.filter(job=job).count() == 3
    # Its folder was the job's (removed with it), and the next job's sandbox waits already.
    wait_for(
        lambda: len(now := _staged(work_root)) >= len(ahead) and ahead - now,
        timeout=60,
        what="the next sandbox started ahead",
    )


@pytest.mark.django_db
@pytest.mark.slow
def test_a_sandbox_that_died_while_its_job_was_prepared_leaves_the_job_to_a_cold_one(
    worker, handed_over, org, owner, local_store, monkeypatch
):
    write_spec = parent._CodeAttempt._write_spec

    def prepared_then_died(self):
        write_spec(self)
        self.warm.process.kill()
        self.warm.process.wait()

    monkeypatch.setattr(parent._CodeAttempt, "_write_spec", prepared_then_died)
    version = _upload(org, owner, local_store.parent, "tiny", TRAINER)

    job = _run(_submit(org, owner, version, {"steps": 2}), worker)

    assert job.state == JobState.SUCCEEDED and handed_over == []
    assert JobMetric.objects.filter(job=job).count() == 2
