"""The factory loop's parts together on the real stack: PostgreSQL, Redis, beat and a Celery
worker running the reconciler, the drift check and the loop's tick at short periods, pool workers
running real training, evaluate and serve jobs (torch), replicas answering over HTTP, and the
predict API in this process. Nothing of the loop is called by hand: the tests send traffic and
labels, add dataset versions, break a worker or a replica, and wait for what the loop does."""

from __future__ import annotations

import os
import signal
from decimal import Decimal

import pytest
from django.test import override_settings
from django.utils import timezone

from billing.invoicing import invoice_issue
from billing.reports import usage_report
from billing.selectors import billing_month
from jobs.models import TERMINAL_STATES
from registry.services import dataset_create
from serving import gateway
from serving.models import (
    LoopEvent,
    ModelCard,
    PredictionCharge,
    PredictionLog,
    Replica,
    Retrain,
    RetrainPolicy,
)
from tenants.actors import Actor
from tenants.models import AuditEvent
from tests.pool import Pool
from tests.processes import alive, descendants, wait_for

from .loop_stack import (
    LOOP_TIMINGS,
    MIN_SAMPLES,
    WINDOW_ROWS,
    Caller,
    dataset_add,
    deploy,
    inputs_of,
    listening_pid,
    promoted_after_feeding,
    routing_key_to,
    train,
    url,
    world,
)

e2e = pytest.mark.django_db(transaction=True)
pytestmark = [pytest.mark.serial]


@pytest.fixture
def stack(tmp_path):
    """The pool with the loop's short periods; start workers with stack.start_worker."""
    pool = Pool(tmp_path)
    pool.env.update(LOOP_TIMINGS)
    with override_settings(
        STORAGE_BACKEND="local",
        STORAGE_LOCAL_ROOT=str(tmp_path / "storage"),
        SERVING_LOOP_MIN_SAMPLES=MIN_SAMPLES,
        SERVING_COLD_START_RETRY_AFTER_S=1,
    ):
        try:
            pool.start_control_plane()
            yield pool
        finally:
            pool.stop()


def _logged(stack, condition, *, timeout: float, what: str):
    try:
        return wait_for(condition, timeout=timeout, what=what)
    except AssertionError:
        print(stack.logs())
        raise


def _ready_replica(deployment, version) -> Replica | None:
    return (
        Replica.objects.filter(
            deployment=deployment, model_version=version, state=Replica.State.READY
        )
        .select_related("job__worker")
        .first()
    )


@e2e
def test_predictions_survive_a_killed_worker_and_appear_in_usage_and_invoices(
    stack, org, owner, key_client_for, tmp_path
):
    """A replica placed by the reconciler answers through the API; its worker is killed with
    SIGKILL; callers see 503s with Retry-After, never a 500 or another answer, until the
    replica answers again from the other worker; its serving time and the predictions are on
    the organization's usage report and invoice."""
    actor = Actor(user=owner)
    labels = stack.start_workers("w1", "w2")
    points = dataset_create(organization=org, name="points", actor=actor)
    v1 = dataset_add(points, world(600, seed=1), tmp_path, actor=actor)
    champion = train(org, v1, actor=actor, wait_for=lambda *a, **k: _logged(stack, *a, **k))
    deployment = deploy(org, champion, actor=actor)
    caller = Caller(key_client_for(owner, org), deployment, [])
    sample = world(5, seed=2)
    rows = inputs_of(sample)

    first = _logged(
        stack, lambda: caller.answered(rows), timeout=120, what="the first prediction"
    ).json()
    assert first["model_version"]["id"] == champion.pk
    assert len({p["prediction_id"] for p in first["predictions"]}) == len(rows)
    outputs = [p["output"] for p in first["predictions"]]
    assert {o["label"] for o in outputs} <= {"yes", "no"}
    feedback = caller.client.post(
        url(deployment, "feedback"),
        {
            "items": [
                {"prediction_id": p["prediction_id"], "label": point["label"]}
                for p, point in zip(first["predictions"], sample, strict=True)
            ]
        },
        format="json",
    )
    assert feedback.json() == {"labelled": len(rows), "unchanged": 0, "unknown": 0}
    assert PredictionLog.objects.filter(deployment=deployment, label__isnull=False).exclude(
        label=""
    ).count() == len(rows)

    # A starting replica whose job already answers takes traffic before the reconciler marks it
    # ready: the first answer may come first.
    replica = _logged(
        stack,
        lambda: _ready_replica(deployment, champion),
        timeout=30,
        what="the reconciler to mark the replica ready",
    )
    job, before = replica.job, len(caller.statuses)
    first_attempt, first_worker = job.attempt, job.worker.name
    label = labels[first_worker]
    doomed = descendants(stack.processes[label].pid) | {stack.processes[label].pid}
    stack.kill(label)
    wait_for(lambda: not alive(doomed), timeout=10, what="the killed worker's processes to die")

    def answering_from_elsewhere():
        response = caller.answered(rows)
        if response is None:
            return None
        assert response.json()["model_version"]["id"] == champion.pk
        assert [p["output"] for p in response.json()["predictions"]] == outputs
        return _ready_replica(deployment, champion)

    moved = _logged(stack, answering_from_elsewhere, timeout=120, what="predictions to resume")
    seen = caller.statuses[before:]
    print(f"status codes after the kill: {sorted(set(seen))}, {seen.count(503)} x 503")
    assert set(seen) <= {200, 503} and 503 in seen
    # Its health checks failing, the reconciler stopped the lost replica and placed a new one
    # (a lease running out first would requeue the same job instead: either way, elsewhere).
    assert moved.job.worker.name != first_worker
    wait_for(lambda: _ended_or_moved(job, first_attempt), timeout=30, what="the lost replica's job")
    job = moved.job

    answered = PredictionLog.objects.filter(deployment=deployment, error="").count()
    wait_for(lambda: _job_usage(org, job.pk) >= 2, timeout=30, what="the replica's seconds billed")
    wait_for(
        lambda: not PredictionCharge.objects.filter(organization=org, usage=None).exists(),
        timeout=30,
        what="beat to price the predictions into the ledger",
    )
    by_resource = {
        row.group: row
        for row in usage_report(
            organization=org,
            start=timezone.now().date(),
            end=timezone.now().date(),
            group_by="resource",
        ).rows
    }
    assert by_resource["predictions"].quantity == Decimal(answered) / 1000
    invoice = invoice_issue(organization=org, month=billing_month(timezone.now()))
    lines = {line.resource: line for line in invoice.lines.all()}
    assert lines["predictions"].quantity == Decimal(answered) / 1000
    assert lines["gpu:cpu"].quantity >= _job_usage(org, job.pk) > 0


def _ended_or_moved(job, first_attempt: int) -> bool:
    job.refresh_from_db()
    return job.state in TERMINAL_STATES or job.attempt > first_attempt


def _job_usage(org, job_id: int) -> Decimal:
    """The replica job's billed seconds on the usage report, grouped by job."""
    today = timezone.now().date()
    report = usage_report(organization=org, start=today, end=today, group_by="job")
    return next((row.quantity for row in report.rows if row.key == str(job_id)), Decimal(0))


def _retrain_in(deployment, *states) -> Retrain | None:
    return (
        Retrain.objects.filter(deployment=deployment, state__in=states)
        .select_related("challenger", "champion")
        .order_by("-pk")
        .first()
    )


@e2e
def test_drift_retrains_gates_and_promotes_then_stops_a_worse_one_and_rolls_back_a_bad_canary(
    stack, org, owner, key_client_for, tmp_path
):
    actor = Actor(user=owner)
    stack.env["WORKER_CPU_SLOTS"] = "3"  # the champion's replica, a job, a canary's replica
    stack.start_worker("w1")
    points = dataset_create(organization=org, name="points", actor=actor)
    v1 = dataset_add(points, world(2000, seed=1), tmp_path, actor=actor)
    champion = train(org, v1, actor=actor, wait_for=lambda *a, **k: _logged(stack, *a, **k))
    deployment = deploy(org, champion, actor=actor)
    RetrainPolicy.objects.create(
        organization=org,
        deployment=deployment,
        dataset=points,
        cooldown_s=0,
        gate_margin=0.1,
        canary_percent=50,
        bake_s=1,
        # The canary's requests are sent a few at a time as the loop is polled: a slow machine must
        # not see it paused as inconclusive after the 1 s bake and its default 3 extensions.
        bake_extensions=60,
        # Latency is not judged here: a shared 2-core machine's p99 over ten requests is noise.
        rollback_p99_ratio=1000,
    )
    caller = Caller(key_client_for(owner, org), deployment, [])
    dataset_add(points, world(2000, seed=2, shifted=True), tmp_path, actor=actor)

    # 1. The world shifts: drift -> retrain on the newest data -> gate -> canary -> 100%.
    shifted = inputs_of(world(WINDOW_ROWS, seed=3, shifted=True))
    _logged(stack, lambda: caller.answered(shifted[:100]), timeout=120, what="the replica")
    caller.predict(shifted[100:])
    canary = _logged(
        stack,
        lambda: _retrain_in(deployment, Retrain.State.CANARY),
        timeout=300,
        what="drift -> retrain -> gate -> canary",
    )
    assert canary.trigger["trigger"] == "drift" and canary.job.input_dataset_version.number == 2
    bake = inputs_of(world(40, seed=4, shifted=True))
    _logged(
        stack,
        lambda: promoted_after_feeding(canary, caller, bake),
        timeout=120,
        what="the canary's promotion",
    )
    promoted = canary.challenger
    kinds = list(LoopEvent.objects.filter(deployment=deployment).values_list("kind", flat=True))
    steps = ("drift_detected", "retrain_submitted", "gate_passed", "canary_started", "promoted")
    assert set(steps) <= set(kinds), kinds
    canary.refresh_from_db()
    costs = dict(
        LoopEvent.objects.filter(
            deployment=deployment, kind__in=["retrain_submitted", "gate_passed"]
        ).values_list("kind", "cost_minor")
    )
    assert costs == {
        "retrain_submitted": canary.job.cost_minor,
        "gate_passed": canary.evaluation_job.cost_minor,
    }
    audited = set(
        AuditEvent.objects.filter(organization=org, action__startswith="serving.loop.").values_list(
            "action", flat=True
        )
    )
    # The monitor audits drift as its own action; each of the loop's steps as serving.loop.*.
    assert {f"serving.loop.{step}" for step in steps[1:]} <= audited, audited
    assert AuditEvent.objects.filter(organization=org, action="serving.drift_detected").exists()
    answer = _logged(stack, lambda: caller.answered(shifted[:5]), timeout=60, what="the new one")
    assert answer.json()["model_version"]["id"] == promoted.pk
    assert ModelCard.objects.get(model_version=promoted).decision == ModelCard.Decision.PASSED

    # 2. Newest data no model can learn from: the challenger is stopped at the gate.
    dataset_add(points, world(2000, seed=5, shifted=True, shuffled=True), tmp_path, actor=actor)
    old_world = inputs_of(world(2 * WINDOW_ROWS, seed=6))
    caller.predict(old_world[:100])
    caller.predict(old_world[100:200])
    stopped = _logged(
        stack,
        lambda: _retrain_in(deployment, Retrain.State.FAILED, Retrain.State.REJECTED),
        timeout=300,
        what="the gate to stop the shuffled-label challenger",
    )
    card = ModelCard.objects.get(model_version=stopped.challenger)
    assert card.decision == ModelCard.Decision.FAILED, card.reasons
    assert LoopEvent.objects.filter(deployment=deployment, kind="gate_failed").exists()

    # 3. Good data, a challenger that passes the gate, and its canary's replica hangs: callers
    # routed to it get 503s, its error rate over the bake rolls it back.
    dataset_add(points, world(2000, seed=7), tmp_path, actor=actor)
    caller.predict(old_world[200:300])
    caller.predict(old_world[300:])
    bad = _logged(
        stack,
        lambda: _retrain_in(deployment, Retrain.State.CANARY),
        timeout=300,
        what="a second canary",
    )
    replica = _logged(
        stack, lambda: _ready_replica(deployment, bad.challenger), timeout=120, what="its replica"
    )
    hung = listening_pid(replica.job.serve_address, stack.processes["w1"].pid)
    os.kill(hung, signal.SIGSTOP)
    try:
        with override_settings(SERVING_FORWARD_TIMEOUT_S=1.0):
            gateway._http = None  # the pooled client takes the shorter timeout
            key = routing_key_to(deployment, bad.challenger)
            refused = caller.predict(old_world[:MIN_SAMPLES], routing_key=key)
            gateway._http = None
    finally:
        os.kill(hung, signal.SIGCONT)
    assert refused.status_code == 503 and refused.headers["Retry-After"], refused.content
    _logged(
        stack,
        lambda: _retrain_in(deployment, Retrain.State.ROLLED_BACK),
        timeout=60,
        what="the rollback",
    )
    rolled = LoopEvent.objects.get(deployment=deployment, kind="rolled_back")
    assert "error rate" in rolled.message
    answer = caller.answered(old_world[:5])
    assert answer.json()["model_version"]["id"] == promoted.pk
    assert set(caller.statuses) <= {200, 503}, caller.statuses
    assert Retrain.objects.filter(deployment=deployment).count() == 3
