"""The pool end to end: real Celery worker processes on Redis, real child processes with torch.

These tests commit to the test database (worker processes must see the rows), so they use
`transaction=True`; each ends with the database as migrated again (tests/migrated_state.py).
"""

from __future__ import annotations

import csv
import io
import random
import time

import pytest

from billing.models import UsageRecord
from jobs.models import TERMINAL_STATES, Job, JobAttempt, JobMetric, JobState, ResourceClass
from jobs.services import JobOptions, inference_job_submit, job_cancel, training_job_submit
from registry.services import dataset_create, dataset_version_create
from tenants.actors import Actor
from tests.processes import alive, descendants, wait_for

e2e = pytest.mark.django_db(transaction=True)


def _separable_csv(rows: int, seed: int = 7) -> bytes:
    rng = random.Random(seed)  # noqa: S311  test data, not security
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["a", "b", "colour", "label"])
    for _ in range(rows):
        a, b = rng.uniform(-1, 1), rng.uniform(-1, 1)
        writer.writerow(
            [f"{a:.4f}", f"{b:.4f}", rng.choice(["red", "blue"]), "yes" if a + b > 0 else "no"]
        )
    return out.getvalue().encode()


@pytest.fixture
def training_data(org, owner, tmp_path, pool):
    dataset = dataset_create(organization=org, name="points", actor=Actor(user=owner))
    path = tmp_path / "points.csv"
    path.write_bytes(_separable_csv(3000))
    return dataset_version_create(
        dataset=dataset, path=path, filename="points.csv", actor=Actor(user=owner)
    )


def _submit(org, owner, version, **parameters) -> Job:
    job, _ = training_job_submit(
        organization=org,
        actor=Actor(user=owner),
        recipe="tabular-classifier",
        parameters={"target": "label", **parameters},
        dataset_version=version,
        options=JobOptions(resource_class=ResourceClass.objects.get(name="cpu"), max_runtime_s=600),
    )
    return job


def _state(job: Job) -> str:
    job.refresh_from_db()
    return job.state


@e2e
def test_a_training_job_runs_end_to_end_and_registers_its_model(pool, org, owner, training_data):
    pool.start_worker("w1")
    job = _submit(org, owner, training_data, epochs=5)
    try:
        wait_for(lambda: _state(job) in TERMINAL_STATES, timeout=120, what="the job to finish")
    except AssertionError:
        print(pool.logs())
        raise
    assert job.state == JobState.SUCCEEDED, job.failure_reason
    version = job.output_model_version
    assert version.metrics["val_accuracy"] > 0.8
    assert list(version.trained_on.all()) == [training_data] and version.source_job_id == job.pk
    assert JobMetric.objects.filter(job=job, name="loss").exists() and job.logs.exists()
    assert UsageRecord.objects.filter(source_id=str(job.pk)).count() == 1


@e2e
def test_cancel_stops_a_running_job_within_five_seconds(pool, org, owner, training_data):
    pool.start_worker("w1")
    job = _submit(
        org, owner, training_data, epochs=1000, early_stopping_patience=1000, batch_size=8
    )
    wait_for(
        lambda: JobMetric.objects.filter(job=job).exists(),
        timeout=120,
        what="the first training step",
    )
    started = time.monotonic()
    job_cancel(job=job, actor=Actor(user=owner))
    wait_for(lambda: _state(job) == JobState.CANCELLED, timeout=10, what="the job to stop")
    assert time.monotonic() - started < 5
    assert JobAttempt.objects.get(job=job).outcome == "cancelled"
    assert UsageRecord.objects.filter(source_id=str(job.pk)).count() == 1


@e2e
def test_a_killed_worker_loses_its_job_which_resumes_from_its_checkpoint_elsewhere(
    pool, org, owner, training_data
):
    labels = pool.start_workers("w1", "w2")
    job = _submit(org, owner, training_data, epochs=12, early_stopping_patience=1000, batch_size=16)
    wait_for(
        lambda: _state(job) == JobState.RUNNING and job.checkpoint_step,
        timeout=120,
        what="a checkpoint",
    )
    first_worker = labels[job.worker.name]
    doomed = descendants(pool.processes[first_worker].pid) | {pool.processes[first_worker].pid}
    pool.kill(first_worker)
    wait_for(
        lambda: not alive(doomed),
        timeout=10,
        what="the killed worker's processes to die",
    )
    try:
        wait_for(
            lambda: _state(job) == JobState.SUCCEEDED,
            timeout=180,
            what="the job to resume and finish",
        )
    except AssertionError:
        print(pool.logs())
        raise
    # On a loaded machine a placement may also lapse before its worker claims it; such an attempt
    # never started (nothing billed, not counted against the job), so only started ones matter.
    attempts = list(JobAttempt.objects.filter(job=job).order_by("number"))
    ran = [a for a in attempts if a.started_at is not None]
    assert [a.outcome for a in ran] == ["lost", "succeeded"], [a.outcome for a in attempts]
    assert ran[0].worker.name != ran[1].worker.name
    assert ran[0].ended_at <= ran[1].started_at  # never two attempts at once
    resumed_steps = JobMetric.objects.filter(job=job, attempt=ran[1].number).values_list(
        "step", flat=True
    )
    assert min(resumed_steps) > 0  # the second attempt continued, it did not start over
    assert UsageRecord.objects.filter(source_id=str(job.pk)).count() == len(ran)


@e2e
def test_train_then_fine_tune_then_batch_prediction(pool, org, owner, training_data):
    from registry.selectors import lineage
    from registry.services import model_alias_set

    pool.start_worker("w1")
    trained = _submit(org, owner, training_data, epochs=3)
    wait_for(lambda: _state(trained) in TERMINAL_STATES, timeout=120, what="training")
    assert trained.state == JobState.SUCCEEDED, trained.failure_reason
    first = trained.output_model_version
    model_alias_set(
        registered_model=first.registered_model,
        alias="production",
        version=first,
        actor=Actor(user=owner),
    )

    cpu = JobOptions(resource_class=ResourceClass.objects.get(name="cpu"))
    tuned, _ = training_job_submit(
        organization=org,
        actor=Actor(user=owner),
        recipe="tabular-classifier",
        parameters={"target": "label", "epochs": 2},
        dataset_version=training_data,
        model_version=first,
        options=cpu,
    )
    infer, _ = inference_job_submit(
        organization=org,
        actor=Actor(user=owner),
        dataset_version=training_data,
        model_version=first,
        options=cpu,
    )
    for job in (tuned, infer):
        wait_for(lambda job=job: _state(job) in TERMINAL_STATES, timeout=120, what=f"job {job.pk}")
        assert job.state == JobState.SUCCEEDED, (job.kind, job.failure_reason, pool.logs())
    second = tuned.output_model_version
    assert second.registered_model == first.registered_model and second.parent_version == first

    predictions = infer.output_dataset_version
    assert predictions.row_count == training_data.row_count
    assert predictions.derived_from_model_version == first and predictions.source_job_id == infer.pk
    assert {"prediction", "probability"} <= {column["name"] for column in predictions.schema}
    graph = lineage(version=training_data)
    assert f"dataset_version:{predictions.pk}" in {node["id"] for node in graph["nodes"]}
