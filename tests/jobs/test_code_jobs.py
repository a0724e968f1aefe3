"""A tenant's own code package run on the real stack: uploaded, submitted with its parameters
checked against its schema, run by a real pool worker in a real bubblewrap sandbox through the
in-job library (factory_job), its metrics, checkpoints and model registered by the parent; and,
written as an attacker would, packages whose lines or outputs the parent refuses, one past its
wall clock, and a worker without bubblewrap.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import tarfile

import pytest

import factory_job
from jobs.models import (
    TERMINAL_STATES,
    Job,
    JobAttempt,
    JobMetric,
    JobState,
    ResourceClass,
    UtilizationSample,
    WorkerRuntime,
)
from jobs.runner import code, parent, protocol, sandbox
from jobs.runner.code import PackageRefused, package_extract, package_line
from jobs.runner.parent import run_attempt
from jobs.runner.sandbox import sandbox_unavailable_reason
from jobs.runtimes import RuntimeReport
from jobs.scheduler.apply import scheduler_pass
from jobs.services import JobOptions
from jobs.services.pool import worker_register
from jobs.services.submission import code_job_submit
from registry.formats.code_packages import CodePackageError
from registry.models import DatasetVersion, ModelVersion
from registry.selectors import lineage
from registry.services import dataset_create, dataset_version_create
from registry.services.code_packages import code_package_limits, code_package_version_create
from registry.storage import get_storage, new_object_key
from tenants.actors import Actor
from tenants.errors import DomainError
from tests.jobs import code_helpers
from tests.jobs.code_helpers import RUNTIME, archive, finished, runtime_python
from tests.processes import alive, descendants, wait_for

e2e = pytest.mark.django_db(transaction=True)

MANIFEST = """
[package]
name = "{name}"
[entry]
train = "trainer:run"
[runtime]
name = "{runtime}"
[outputs]
{outputs}
[parameters]
type = "object"
required = ["steps"]
additionalProperties = false
[parameters.properties.steps]
type = "integer"
minimum = 1
[parameters.properties.lr]
type = "number"
"""

# A training loop in plain Python: three steps, a checkpoint each, a safetensors file written by
# hand (no numpy or torch needed in the runtime), registered as the model.
TRAINER = """
import json, struct
import factory_job

def run():
    p = factory_job.params()
    state = factory_job.latest() or {"step": 0, "w": 0.0}
    for step in range(state["step"] + 1, p["steps"] + 1):
        state = {"step": step, "w": state["w"] + p.get("lr", 0.1)}
        factory_job.log(step=step, loss=1.0 / step)
        factory_job.save(state, step=step)
    print("trained", state["w"])
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path = factory_job.checkpoint_dir().parent / "output" / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + struct.pack("<2f", state["w"], 1))
    factory_job.register_model(path, {"steps": p["steps"]})
"""

# Hostile entries: each does one thing the parent must refuse.
FORGED_ATTEMPT = """
import json, factory_job

def run():
    print("@@metric " + json.dumps(
        {"step": 1, "name": "loss", "value": 0.5, "split": "train", "attempt": 7}))
    factory_job.log(step=2, loss=0.25)
"""
OUTSIDE_PATH = """
import factory_job

def run():
    factory_job._out.line("result", {"metrics": {}, "input_signature": {}, "parameters": {},
        "artifacts": {"model.safetensors": "/etc/passwd", "config.json": "output/config.json"}})
"""
SYMLINK_OUT = """
import json, os, factory_job

def run():
    os.symlink("/etc/passwd", "/job/output/model.safetensors")
    with open("/job/output/config.json", "w") as f:
        json.dump({}, f)
    factory_job._out.line("result", {"metrics": {}, "input_signature": {}, "parameters": {},
        "artifacts": {"model.safetensors": "output/model.safetensors",
                      "config.json": "output/config.json"}})
    os._exit(0)  # its own result stands: the library prints none after it
"""
PAST_ITS_WALL_CLOCK = """
import time, factory_job

def run():
    factory_job.log(step=0, loss=1.0)
    while True:  # ignores should_stop(), and SIGTERM is only a flag to it
        time.sleep(0.05)
"""


def _package(name: str, trainer: str, outputs: str = "model = true") -> bytes:
    return archive(
        {
            "factory.toml": MANIFEST.format(name=name, outputs=outputs, runtime=RUNTIME),
            "trainer.py": trainer,
        }
    )


def _upload(org, owner, tmp_path, name: str, trainer: str, outputs: str = "model = true"):
    path = tmp_path / f"{name}.tar.gz"
    path.write_bytes(_package(name, trainer, outputs))
    return code_package_version_create(
        organization=org, path=path, filename=path.name, actor=Actor(user=owner)
    )


def _submit(org, owner, version, parameters, dataset_version=None, **options):
    options.setdefault("max_runtime_s", 600)
    job, _ = code_job_submit(
        organization=org,
        actor=Actor(user=owner),
        code_package_version=version,
        parameters=parameters,
        dataset_version=dataset_version,
        options=JobOptions(resource_class=ResourceClass.objects.get(name="cpu"), **options),
    )
    return job


def _worker():
    """A worker row offering the packages' runtime, as a worker process registers one."""
    report = RuntimeReport(name=RUNTIME, interpreter=runtime_python(), python_version="3")
    return worker_register(name=f"cpu-{os.urandom(3).hex()}", devices=[], runtimes=[report])


@e2e
def test_a_code_package_trains_in_the_sandbox_and_registers_its_model(
    sandboxed_pool, org, owner, tmp_path
):
    version = _upload(org, owner, tmp_path, "tiny", TRAINER)
    job = _submit(org, owner, version, {"steps": 3, "lr": 0.5})
    assert job.code_package_version == version and job.recipe == "code:tiny"
    sandboxed_pool.start_worker("w1")

    job = finished(job, sandboxed_pool)

    assert job.state == JobState.SUCCEEDED, job.failure_reason
    metrics = JobMetric.objects.filter(job=job, name="loss").order_by("step")
    assert [(m.step, m.value, m.attempt) for m in metrics] == [
        (1, 1.0, 1),
        (2, 0.5, 1),
        (3, pytest.approx(1 / 3), 1),
    ]
    assert job.logs.filter(line="trained 1.5").exists()  # its own print, a log line
    model = ModelVersion.objects.get(pk=job.output_model_version_id)
    assert model.registered_model.name == "tiny" and model.registered_model.organization == org
    assert (model.recipe_name, model.recipe_version) == ("code:tiny", "v1")
    assert model.source_job_id == job.pk
    assert Job.objects.get(pk=model.source_job_id).code_package_version == version
    assert model.parameters == {"steps": 3, "lr": 0.5} and model.metrics == {"loss": 1 / 3}
    assert list(JobAttempt.objects.filter(job=job).values_list("outcome", flat=True)) == [
        "succeeded"
    ]


@e2e
def test_hostile_packages_are_refused_with_a_reason_and_the_worker_goes_on(
    sandboxed_pool, org, owner, tmp_path
):
    jobs = {
        name: _submit(org, owner, _upload(org, owner, tmp_path, name, trainer), {"steps": 1})
        for name, trainer in (
            ("forged-attempt", FORGED_ATTEMPT),
            ("outside-path", OUTSIDE_PATH),
            ("symlink-out", SYMLINK_OUT),
            ("past-its-clock", PAST_ITS_WALL_CLOCK),
        )
    }
    # Below the 60 s a submission may ask for, so that the test does not wait a minute.
    Job.objects.filter(pk=jobs["past-its-clock"].pk).update(max_runtime_s=2)
    sandboxed_pool.start_worker("w1")
    ended = {name: finished(job, sandboxed_pool, timeout=180) for name, job in jobs.items()}

    assert all(job.state == JobState.FAILED for job in ended.values()), {
        name: (job.state, job.failure_reason) for name, job in ended.items()
    }
    reasons = {name: job.failure_reason for name, job in ended.items()}
    assert "refused @@metric" in reasons["forged-attempt"]
    assert "'attempt'" in reasons["forged-attempt"]
    assert not JobMetric.objects.filter(job=ended["forged-attempt"]).exists()
    assert (
        "refused @@result" in reasons["outside-path"] and "/etc/passwd" in reasons["outside-path"]
    )
    assert reasons["symlink-out"].startswith("Could not register the outputs")
    assert "link" in reasons["symlink-out"]
    assert reasons["past-its-clock"] == "Exceeded its maximum runtime of 2 s."
    assert not ModelVersion.objects.filter(organization=org).exists()
    # The worker went on: after all four, a good package still runs on it.
    good = _submit(org, owner, _upload(org, owner, tmp_path, "tiny", TRAINER), {"steps": 1})
    assert finished(good, sandboxed_pool).state == JobState.SUCCEEDED, good.failure_reason


@pytest.fixture
def sandbox_work_root(settings):
    """WORKER_WORKDIR for an in-process worker running sandboxes."""
    with code_helpers.sandbox_work_root() as work:
        settings.WORKER_WORKDIR = str(work)
        yield work


# TRAINER, a step every 0.3 s: time to kill its worker between two checkpoints.
SLOW_TRAINER = TRAINER.replace("import json, struct", "import json, struct, time").replace(
    "        factory_job.log(step=step",
    "        time.sleep(0.3)\n        factory_job.log(step=step",
)


@e2e
def test_a_killed_worker_loses_the_package_which_resumes_from_its_checkpoint_elsewhere(
    sandboxed_pool, org, owner, tmp_path
):
    """The issue's journey on the real stack: a package runs in the sandbox, its worker is
    killed with SIGKILL after a checkpoint, another worker resumes it from that checkpoint in its
    own sandbox, it finishes and registers its model with lineage to the package version and its
    input dataset version, and each attempt that ran is billed once."""
    from billing.models import UsageRecord

    version = _upload(org, owner, tmp_path, "slow", SLOW_TRAINER)
    (tmp_path / "rows.csv").write_text("x,y\n1,2\n3,4\n")
    dataset = dataset_create(organization=org, name="rows", actor=Actor(user=owner))
    data = dataset_version_create(
        dataset=dataset, path=tmp_path / "rows.csv", filename="rows.csv", actor=Actor(user=owner)
    )
    # Both workers up before the submit: submitted first, the job could run to its end on the
    # first worker while the second was still starting, leaving no checkpoint to wait for.
    labels = sandboxed_pool.start_workers("w1", "w2")
    job = _submit(org, owner, version, {"steps": 30, "lr": 0.5}, dataset_version=data)

    def checkpointed_or_ended():
        j = Job.objects.get(pk=job.pk)
        return j.state in TERMINAL_STATES or (j.state == JobState.RUNNING and j.checkpoint_step)

    try:
        wait_for(checkpointed_or_ended, timeout=120, what="a checkpoint")
    except AssertionError:
        print(sandboxed_pool.logs())
        raise
    job.refresh_from_db()
    assert job.state == JobState.RUNNING, f"it ended ({job.state}) before its worker was killed"
    first = labels[job.worker.name]
    doomed = descendants(sandboxed_pool.processes[first].pid) | {
        sandboxed_pool.processes[first].pid
    }
    sandboxed_pool.kill(first)
    wait_for(lambda: not alive(doomed), timeout=10, what="the killed worker's processes to die")

    job = finished(job, sandboxed_pool, timeout=240)

    assert job.state == JobState.SUCCEEDED, job.failure_reason
    attempts = list(JobAttempt.objects.filter(job=job).order_by("number"))
    ran = [a for a in attempts if a.started_at is not None]
    assert [a.outcome for a in ran] == ["lost", "succeeded"], [a.outcome for a in attempts]
    assert ran[0].worker.name != ran[1].worker.name
    assert ran[0].ended_at <= ran[1].started_at
    resumed = JobMetric.objects.filter(job=job, attempt=ran[1].number, name="loss")
    assert min(resumed.values_list("step", flat=True)) > 1  # it continued, it did not start over
    model = ModelVersion.objects.get(pk=job.output_model_version_id)
    assert Job.objects.get(pk=model.source_job_id).code_package_version == version
    assert model.recipe_name == "code:slow"
    graph = lineage(version=model)
    made = {(e["from"], e["relation"], e["to"]) for e in graph["edges"]}
    assert made >= {
        (f"code_package_version:{version.pk}", "ran", f"job:{job.pk}"),
        (f"dataset_version:{data.pk}", "trained", f"job:{job.pk}"),
        (f"job:{job.pk}", "produced", f"model_version:{model.pk}"),
    }
    # 30 steps of +0.5 from the checkpoint's state: the resumed run carried the weight on.
    assert model.metrics == {"loss": pytest.approx(1 / 30)}
    assert UsageRecord.objects.filter(source_id=str(job.pk)).count() == len(ran)


@pytest.mark.django_db
@pytest.mark.slow
def test_a_resumed_attempt_continues_from_its_checkpoint_and_stores_new_ones(
    org, owner, local_store, sandbox_work_root, monkeypatch
):
    version = _upload(org, owner, local_store.parent, "tiny", TRAINER)
    job = _submit(org, owner, version, {"steps": 4, "lr": 0.5})
    # The checkpoint an earlier attempt stored: step 2, w = 1.0 (JSON: the runtime may lack torch).
    key = new_object_key(organization_id=org.pk, kind="checkpoints", filename=f"job-{job.pk}.pt")
    get_storage().save(key, io.BytesIO(b'{"step": 2, "w": 1.0}'))
    Job.objects.filter(pk=job.pk).update(checkpoint_key=key, checkpoint_step=2)
    stored = []
    real_checkpoint = parent.attempt_checkpoint

    def recording(**kwargs):
        stored.append((kwargs["step"], get_storage().open(kwargs["key"]).read()))
        return real_checkpoint(**kwargs)

    monkeypatch.setattr(parent, "attempt_checkpoint", recording)
    worker = _worker()
    scheduler_pass()

    assert run_attempt(job_id=job.pk, attempt=1, worker_id=worker.pk) == "succeeded"

    job.refresh_from_db()
    assert list(JobMetric.objects.filter(job=job).values_list("step", flat=True)) == [3, 4]
    assert [step for step, _ in stored] == [3, 4]
    assert json.loads(stored[-1][1]) == {"step": 4, "w": 2.0}
    model = ModelVersion.objects.get(pk=job.output_model_version_id)
    weights = get_storage().open(model.artifacts.get(name="model.safetensors").storage_key).read()
    (length,) = struct.unpack("<Q", weights[:8])
    assert struct.unpack("<2f", weights[8 + length :]) == (2.0, 1.0)  # 1.0 + 2 steps x 0.5
    assert not list(sandbox_work_root.iterdir())  # attempt, code and archive folders removed


# Holds 64 MiB and burns a core for a second and a half, in a process of its own inside the
# sandbox: what the worker samples is the sandbox's whole tree, seen from outside it.
BURN = (
    "held = b'x' * (64 * 2**20)\nimport time\n"
    "end = time.time() + 1.5\nwhile time.time() < end: pass"
)
BURNS = TRAINER.replace(
    "def run():\n",
    f"import subprocess, sys\n\ndef run():\n    subprocess.run([sys.executable, '-c', {BURN!r}])\n",
)


@pytest.mark.django_db
@pytest.mark.slow
def test_a_sandboxed_packages_processes_are_sampled_from_outside(
    org, owner, local_store, sandbox_work_root, settings
):
    settings.UTILIZATION_SAMPLE_S = 0.2
    version = _upload(org, owner, local_store.parent, "burns", BURNS)
    job = _submit(org, owner, version, {"steps": 1})
    worker = _worker()
    scheduler_pass()

    assert run_attempt(job_id=job.pk, attempt=1, worker_id=worker.pk) == "succeeded"

    samples = UtilizationSample.objects.filter(job=job, attempt=1)
    assert samples.filter(memory_bytes__gt=64 * 2**20, cpu_cores__gt=0.3).count() >= 2
    summary = JobAttempt.objects.get(job=job, number=1).utilization
    assert summary["samples"] == samples.count() and summary["memory_bytes_peak"] > 64 * 2**20


MAKES_ROWS = """
import factory_job

def run():
    with open("/job/output/rows.csv", "w") as f:
        f.write("x,y\\n" + "".join(f"{i},{i * i}\\n" for i in range(factory_job.params()["steps"])))
    factory_job.register_dataset("/job/output/rows.csv")
"""


@pytest.mark.django_db
@pytest.mark.slow
def test_a_package_registers_a_dataset_version_under_the_jobs_name(
    org, owner, local_store, sandbox_work_root
):
    version = _upload(
        org, owner, local_store.parent, "rows", MAKES_ROWS, outputs="model = false\ndataset = true"
    )
    job = _submit(org, owner, version, {"steps": 5})
    assert (job.output_model_name, job.output_dataset_name) == ("", "rows-output")
    worker = _worker()
    scheduler_pass()

    assert run_attempt(job_id=job.pk, attempt=1, worker_id=worker.pk) == "succeeded"

    job.refresh_from_db()
    made = DatasetVersion.objects.get(pk=job.output_dataset_version_id)
    assert made.dataset.name == "rows-output" and made.dataset.organization == org
    assert (made.source, made.source_job_id, made.format) == ("job_output", job.pk, "csv")
    assert job.output_model_version_id is None


@pytest.mark.django_db
@pytest.mark.slow
def test_a_worker_without_bubblewrap_refuses_code_packages_saying_why(
    org, owner, local_store, tmp_path, monkeypatch, settings
):
    settings.WORKER_WORKDIR = str(tmp_path / "work")
    version = _upload(org, owner, tmp_path, "tiny", TRAINER)
    job = _submit(org, owner, version, {"steps": 1})
    real_which = shutil.which
    # The probe's edge: bubblewrap is not on this worker's PATH.
    monkeypatch.setattr(
        sandbox.shutil, "which", lambda name, *a, **k: None if name == "bwrap" else real_which(name)
    )
    sandbox_unavailable_reason.cache_clear()
    try:
        worker = _worker()
        scheduler_pass()
        assert run_attempt(job_id=job.pk, attempt=1, worker_id=worker.pk) == "failed"
    finally:
        sandbox_unavailable_reason.cache_clear()
    job.refresh_from_db()
    assert job.state == JobState.FAILED
    assert job.failure_reason.startswith("This worker cannot run a code package: ")
    assert "bubblewrap is not installed on worker" in job.failure_reason


@pytest.mark.django_db
@pytest.mark.slow
def test_a_worker_that_lost_the_runtime_refuses_the_package_naming_it(
    org, owner, local_store, sandbox_work_root
):
    job = _submit(
        org, owner, _upload(org, owner, local_store.parent, "tiny", TRAINER), {"steps": 1}
    )
    assert job.runtime == RUNTIME
    worker = _worker()
    scheduler_pass()
    WorkerRuntime.objects.filter(worker=worker).update(error="python3: not found")

    assert run_attempt(job_id=job.pk, attempt=1, worker_id=worker.pk) == "failed"

    job.refresh_from_db()
    assert job.failure_reason == (
        "This worker cannot run a code package: This worker does not offer the runtime "
        "'torch-2.13-py311' the package needs."
    )


@pytest.mark.django_db
def test_parameters_are_checked_against_the_package_schema(
    org, other_org, owner, local_store, tmp_path
):
    version = _upload(org, owner, tmp_path, "tiny", TRAINER)
    with pytest.raises(DomainError) as refused:
        _submit(org, owner, version, {"steps": 0, "extra": 1})
    assert "parameters" in str(refused.value.detail)
    assert set(refused.value.fields) >= {"parameters", "parameters.steps"}
    with pytest.raises(DomainError):
        _submit(org, owner, version, {"steps": "3"})
    with pytest.raises(DomainError, match="own versions"):
        _submit(other_org, owner, version, {"steps": 1})
    assert not Job.objects.exists()
    job = _submit(org, owner, version, {"steps": 2})
    assert (job.recipe, job.recipe_version, job.output_model_name) == ("code:tiny", "v1", "tiny")


@pytest.mark.django_db
def test_a_schema_that_refers_to_itself_without_end_is_a_400_not_a_500(
    org, owner, local_store, tmp_path
):
    """`$ref: "#"` passes the manifest's checks (it stays inside the schema) but validating
    against it never ends: the submission says so."""
    version = _upload(org, owner, tmp_path, "loops", TRAINER)
    version.manifest["parameters"] = {"type": "object", "allOf": [{"$ref": "#"}]}
    version.save(update_fields=["manifest"])
    with pytest.raises(DomainError, match="refers to itself"):
        _submit(org, owner, version, {"steps": 1})
    assert not Job.objects.exists()


def test_the_library_speaks_the_parents_protocol():
    assert (
        factory_job.EXIT_OK,
        factory_job.EXIT_FAILED,
        factory_job.EXIT_BAD_INPUT,
        factory_job.EXIT_STOPPED,
    ) == (protocol.EXIT_OK, protocol.EXIT_FAILED, protocol.EXIT_BAD_INPUT, protocol.EXIT_STOPPED)
    assert factory_job.LINE_PREFIX == protocol.LINE_PREFIX


@pytest.mark.parametrize(
    "line",
    [
        '@@metric {"step": 1, "name": "loss", "value": 0.5, "split": "train", "attempt": 7}',
        '@@attempt {"number": 7}',
        '@@serving {"port": 8000}',
        '@@checkpoint {"path": "/etc/passwd", "step": 1}',
        '@@checkpoint {"path": "checkpoints/../../x", "step": 1}',
        '@@result {"metrics": {}, "artifacts": {"other": "output/x"}, "input_signature": {}, '
        '"parameters": {}}',
        '@@result {"metrics": {"loss": "low"}, "artifacts": {}, "input_signature": {}, '
        '"parameters": {}}',
        '@@metric {"step": 1, "name": "loss", "value": NaN, "split": "train"}',
        "@@metric {not json",
        '@@metric {"step": true, "name": "loss", "value": 1, "split": "train"}',
    ],
)
def test_a_line_the_package_may_not_print_is_refused(line):
    with pytest.raises(PackageRefused):
        package_line(line)


def test_lines_the_package_may_print_are_read():
    assert package_line('@@metric {"step": 1, "name": "loss", "value": 0.5, "split": "val"}') == (
        "metric",
        {"step": 1, "name": "loss", "value": 0.5, "split": "val"},
    )
    assert package_line("@@ not structured")[0] == "log"
    assert package_line("plain words") == ("log", "plain words")


def test_extraction_refuses_links_and_writes_read_only_files(tmp_path):
    good = tmp_path / "good.tar.gz"
    good.write_bytes(_package("tiny", TRAINER))
    target = tmp_path / "code"
    target.mkdir()
    package_extract(good, target, limits=code_package_limits())
    assert sorted(p.name for p in target.iterdir()) == ["factory.toml", "trainer.py"]
    assert (target / "trainer.py").stat().st_mode & 0o777 == 0o644

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        data = MANIFEST.format(name="tiny", outputs="model = true", runtime=RUNTIME).encode()
        info = tarfile.TarInfo("factory.toml")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("trainer.py")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    hostile = tmp_path / "hostile.tar.gz"
    hostile.write_bytes(buffer.getvalue())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(CodePackageError, match="link"):
        package_extract(hostile, elsewhere, limits=code_package_limits())
    assert not list(elsewhere.iterdir())
    assert code.CODE_FOLDER == "/code"
