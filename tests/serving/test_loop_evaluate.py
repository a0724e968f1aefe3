"""The gate's evaluate job for real: a pool worker trains the champion (on labels flipped, so it
is bad), the policy retrains on the newest, clean version of the data, and the evaluate job scores
both on the retrain's own validation rows, overall and per slice, before the gate lets the
challenger into a canary."""

from __future__ import annotations

import csv
import io
import random

import pytest
from django.utils import timezone

from jobs.models import TERMINAL_STATES, Job, JobEvent, JobState, ResourceClass
from jobs.services import JobOptions, training_job_submit
from registry.services import dataset_create, dataset_version_create
from serving.loop import loop_advance
from serving.models import (
    Deployment,
    DriftReport,
    LoopEvent,
    ModelCard,
    Retrain,
    RetrainPolicy,
    Route,
)
from tenants.actors import Actor
from tests.processes import wait_for

e2e = pytest.mark.django_db(transaction=True, serialized_rollback=True)


def _points(rows: int, *, flipped: bool, seed: int) -> bytes:
    rng = random.Random(seed)  # noqa: S311  test data, not security
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["a", "b", "colour", "label"])
    for _ in range(rows):
        a, b = rng.uniform(-1, 1), rng.uniform(-1, 1)
        positive = (a + b > 0) != flipped
        writer.writerow(
            [f"{a:.4f}", f"{b:.4f}", rng.choice(["red", "blue"]), "yes" if positive else "no"]
        )
    return out.getvalue().encode()


def _finished(job: Job) -> bool:
    job.refresh_from_db()
    return job.state in TERMINAL_STATES


def _advanced_to(deployment, state) -> bool:
    retrain = loop_advance(deployment_id=deployment.pk)
    return retrain is not None and retrain.state == state


@e2e
def test_a_real_evaluate_job_scores_both_versions_on_held_out_rows(pool, org, owner, tmp_path):
    actor = Actor(user=owner)
    cpu = ResourceClass.objects.get(name="cpu")
    dataset = dataset_create(organization=org, name="points", actor=actor)
    versions = []
    for number, flipped in ((1, True), (2, False)):
        path = tmp_path / f"points-{number}.csv"
        path.write_bytes(_points(600, flipped=flipped, seed=number))
        versions.append(
            dataset_version_create(dataset=dataset, path=path, filename=path.name, actor=actor)
        )
    pool.start_worker("w1")
    job, _ = training_job_submit(
        organization=org,
        actor=actor,
        recipe="tabular-classifier",
        parameters={"target": "label", "epochs": 4, "learning_rate": 0.05},
        dataset_version=versions[0],
        options=JobOptions(resource_class=cpu, max_runtime_s=600),
        output_model_name="points",
    )
    try:
        wait_for(lambda: _finished(job), timeout=180, what="the champion's training")
        assert job.state == JobState.SUCCEEDED, job.failure_reason
        champion = job.output_model_version
        deployment = Deployment.objects.create(
            organization=org,
            name="points",
            recipe="tabular-classifier",
            resource_class=cpu,
            created_by=owner,
        )
        Route.objects.create(
            organization=org, deployment=deployment, model_version=champion, weight=100
        )
        RetrainPolicy.objects.create(
            organization=org,
            deployment=deployment,
            dataset=dataset,
            slice_column="colour",
            gate_margin=0.1,
            slice_tolerance=0.05,
        )
        now = timezone.now()
        DriftReport.objects.create(
            organization=org,
            deployment=deployment,
            model_version=champion,
            window_start=now,
            window_end=now,
            rows=1000,
            drifted=True,
            drifted_share=1.0,
        )
        retrain = loop_advance(deployment_id=deployment.pk)
        assert retrain.job.input_dataset_version == versions[1]
        wait_for(lambda: _finished(retrain.job), timeout=180, what="the retrain")
        assert retrain.job.state == JobState.SUCCEEDED, retrain.job.failure_reason
        wait_for(
            lambda: _advanced_to(deployment, Retrain.State.EVALUATING),
            timeout=30,
            what="the evaluate job's submission",
        )
        retrain.refresh_from_db()
        wait_for(lambda: _finished(retrain.evaluation_job), timeout=180, what="the evaluation")
    except AssertionError:
        print(pool.logs())
        raise
    evaluation = retrain.evaluation_job
    assert evaluation.state == JobState.SUCCEEDED, evaluation.failure_reason
    assert JobEvent.objects.filter(job=evaluation, kind="evaluation").exists()
    wait_for(lambda: _advanced_to(deployment, Retrain.State.CANARY), timeout=30, what="the gate")
    card = ModelCard.objects.get(model_version=retrain.job.output_model_version)
    metrics = card.metrics
    assert card.decision == ModelCard.Decision.PASSED, card.reasons
    # 600 rows at the default validation fraction of 0.2: 120 held out.
    assert metrics["rows"] == 120
    assert metrics["challenger"]["overall"] > 0.8 > 0.3 > metrics["champion"]["overall"]
    assert set(metrics["challenger"]["slices"]) == {"red", "blue"}
    assert card.lineage["datasets"][0]["version"] == 2
    gate = LoopEvent.objects.get(deployment=deployment, kind=LoopEvent.Kind.GATE_PASSED)
    assert gate.job == evaluation and gate.cost_minor == evaluation.cost_minor
