"""The worker checks every input it downloads against the size and sha256 the registry recorded:
a stored object changed behind a version (a compromised or corrupted store) fails the attempt
with a reason saying which input, instead of training on it."""

from __future__ import annotations

import io
import json

import pytest

from jobs.models import TERMINAL_STATES, Job, JobState, ResourceClass
from jobs.runner import protocol
from jobs.runner.parent import InputMismatch, _Attempt
from jobs.scheduler.apply import scheduler_pass
from jobs.services import JobOptions, training_job_submit
from jobs.services.attempts import attempt_claim
from registry.services import (
    model_version_register,
    registered_model_create,
)
from registry.storage import get_storage
from tenants.actors import Actor
from tests.factories import JobFactory
from tests.jobs.held_attempt import points_version
from tests.processes import wait_for

e2e = pytest.mark.django_db(transaction=True)


def _same_size_tampering(data: bytes) -> bytes:
    """The same rows in reverse order: a valid CSV of the same size, other bytes."""
    header, *rows = data.splitlines(keepends=True)
    return header + b"".join(reversed(rows))


def _replace_stored(key: str, data: bytes) -> None:
    """Change an object behind the registry's back, as a compromised or faulty store would."""
    get_storage().save(key, io.BytesIO(data))


@pytest.fixture
def dataset_version(local_storage, org, owner, tmp_path):
    return points_version(org, owner, tmp_path, rows=50)


@pytest.fixture
def model_version(local_storage, org, owner, tmp_path, weights_bytes):
    path = tmp_path / "model.safetensors"
    path.write_bytes(weights_bytes)
    actor = Actor(user=owner)
    return model_version_register(
        registered_model=registered_model_create(organization=org, name="churn", actor=actor),
        weights_path=path,
        config={"layers": 1},
        actor=actor,
    )


def _attempt(tmp_path, **job_fields) -> _Attempt:
    workdir = tmp_path / "work"
    workdir.mkdir()
    return _Attempt(JobFactory(**job_fields), 1, workdir)


@pytest.mark.django_db
def test_inputs_that_match_their_record_are_fetched(tmp_path, dataset_version, model_version):
    attempt = _attempt(
        tmp_path,
        organization=dataset_version.organization,
        kind=Job.Kind.INFER,
        input_dataset_version=dataset_version,
        input_model_version=model_version,
    )

    attempt._write_spec()

    spec = json.loads((attempt.workdir / protocol.SPEC_FILENAME).read_text())
    fetched = attempt.workdir / "dataset.csv"
    assert spec["dataset"]["path"] == str(fetched)
    assert fetched.stat().st_size == dataset_version.size_bytes
    assert sorted(p.name for p in (attempt.workdir / "model").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]


@pytest.mark.django_db
def test_a_dataset_changed_in_storage_is_refused_naming_it(tmp_path, dataset_version):
    original = get_storage()
    with original.open(dataset_version.storage_key) as reader:
        _replace_stored(dataset_version.storage_key, _same_size_tampering(reader.read()))
    attempt = _attempt(
        tmp_path, organization=dataset_version.organization, input_dataset_version=dataset_version
    )

    with pytest.raises(
        InputMismatch, match="input dataset points v1 does not match its recorded sha256"
    ):
        attempt._write_spec()

    assert not (attempt.workdir / "dataset.csv").exists()
    assert not (attempt.workdir / protocol.SPEC_FILENAME).exists()


@pytest.mark.django_db
def test_a_dataset_grown_in_storage_is_refused_without_reading_it_all(tmp_path, dataset_version):
    _replace_stored(dataset_version.storage_key, b"a,label\n" + b"1,yes\n" * 1_000_000)
    attempt = _attempt(
        tmp_path, organization=dataset_version.organization, input_dataset_version=dataset_version
    )

    with pytest.raises(InputMismatch) as refused:
        attempt._write_spec()

    assert f"recorded size (recorded {dataset_version.size_bytes}, downloaded more than" in str(
        refused.value
    )


@pytest.mark.django_db
def test_model_weights_changed_in_storage_are_refused_naming_them(
    tmp_path, dataset_version, model_version
):
    weights = model_version.artifacts.get(name="model.safetensors")
    _replace_stored(weights.storage_key, b"\x00" * weights.size_bytes)
    attempt = _attempt(
        tmp_path,
        organization=dataset_version.organization,
        kind=Job.Kind.INFER,
        input_dataset_version=dataset_version,
        input_model_version=model_version,
    )

    with pytest.raises(
        InputMismatch,
        match=r"input model churn v1 model\.safetensors does not match its recorded sha256",
    ):
        attempt._write_spec()

    assert not (attempt.workdir / "model" / "model.safetensors").exists()


@pytest.mark.django_db
def test_an_attempt_with_a_changed_input_fails_at_once_with_the_reason(
    tmp_path, dataset_version, register_worker, settings
):
    settings.JOB_STORAGE_RETRY_S = 60  # a mismatch is not an outage: nothing waits
    _replace_stored(dataset_version.storage_key, b"x" * dataset_version.size_bytes)
    worker = register_worker("cpu-inputs")
    job = JobFactory(
        organization=dataset_version.organization, input_dataset_version=dataset_version
    )
    scheduler_pass()
    job = attempt_claim(job_id=job.pk, attempt=1, worker_id=worker.pk)
    workdir = tmp_path / "attempt"
    workdir.mkdir()

    assert _Attempt(job, 1, workdir).run() == "failed"

    job.refresh_from_db()
    assert job.state == JobState.FAILED
    assert "input dataset points v1 does not match its recorded sha256" in job.failure_reason


@e2e
def test_a_job_whose_dataset_was_changed_in_storage_fails_saying_so(pool, org, owner, tmp_path):
    version = points_version(org, owner, tmp_path, rows=300)
    tampered = _same_size_tampering((tmp_path / "points.csv").read_bytes())
    assert len(tampered) == version.size_bytes
    get_storage().save(version.storage_key, io.BytesIO(tampered))  # behind the registry's back
    pool.start_worker("w1")

    job, _ = training_job_submit(
        organization=org,
        actor=Actor(user=owner),
        recipe="tabular-classifier",
        parameters={"target": "label", "epochs": 2},
        dataset_version=version,
        options=JobOptions(resource_class=ResourceClass.objects.get(name="cpu"), max_runtime_s=600),
    )
    try:
        wait_for(
            lambda: job.refresh_from_db() or job.state in TERMINAL_STATES,
            timeout=120,
            what="the job to end",
        )
    except AssertionError:
        print(pool.logs())
        raise

    assert job.state == JobState.FAILED, job.state
    assert "input dataset points v1 does not match its recorded sha256" in job.failure_reason
    assert job.output_model_version is None
