"""Replicas on the pool: serve jobs admitted like any job, placed by the scheduler, run on a real
pool worker as a child that loads its model version once and answers HTTP, billed while they run,
drained when stopped and placed again when their worker dies."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from datetime import timedelta
from decimal import Decimal

import httpx
import pytest
from django.utils import timezone

from billing.models import UsageRecord
from jobs.models import TERMINAL_STATES, Job, JobAttempt, JobState, ResourceClass
from jobs.recipes.tabular import TabularClassifier
from jobs.runner.parent import run_attempt
from jobs.samples.tabular import write_tabular_sample
from jobs.selectors import job_cost_so_far
from jobs.services import job_retry
from jobs.services.attempts import (
    StaleAttempt,
    attempt_advertise,
    attempt_bill_running,
    attempt_finish,
)
from jobs.services.pool import (
    reap_lost,
    replicas_move_off_draining,
    worker_register,
    worker_set_status,
)
from jobs.services.replicas import replica_job_stop, replica_job_submit, replica_token
from registry.services import model_version_register, registered_model_create
from tenants.actors import Actor
from tenants.errors import ConflictError, DomainError
from tenants.models import AuditEvent, Organization
from tenants.standing import OrganizationRestricted
from tests.factories import JobFactory, PriceFactory
from tests.jobs.recipe_helpers import read_csv, recipe_context
from tests.processes import alive, descendants, wait_for

e2e = pytest.mark.django_db(transaction=True)


def _cpu() -> ResourceClass:
    return ResourceClass.objects.get(name="cpu")


def _register(organization, owner, weights_path, config, *, name="churn", recipe=None):
    registered = registered_model_create(
        organization=organization, name=name, actor=Actor(user=owner)
    )
    return model_version_register(
        registered_model=registered,
        weights_path=weights_path,
        config=config,
        actor=Actor(user=owner),
        recipe_name=TabularClassifier.name if recipe is None else recipe,
    )


@pytest.fixture
def stored_version(org, owner, local_store, tmp_path, weights_bytes):
    """A tabular version with files (not a real model: enough for admission)."""
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights_bytes)
    return _register(org, owner, weights, {"recipe": TabularClassifier.name})


# Admission and stop, against the database


def test_a_replica_is_a_serve_job_admitted_like_any_job(org, owner, stored_version):
    job = replica_job_submit(
        organization=org,
        model_version=stored_version,
        resource_class=_cpu(),
        actor=Actor(user=owner),
        labels={"deployment": "churn"},
    )
    assert (job.kind, job.state, job.recipe) == (
        Job.Kind.SERVE,
        JobState.QUEUED,
        "tabular-classifier",
    )
    assert job.input_model_version == stored_version and job.input_dataset_version is None
    assert job.max_runtime_s == 0 and job.gpu_count == 1 and job.labels == {"deployment": "churn"}
    assert AuditEvent.objects.filter(action="job.submit", target_id=str(job.pk)).exists()


def test_another_organizations_version_is_refused_and_nothing_is_queued(
    org, owner, other_org, stored_version
):
    """The attack: org B's deployment asks for org A's version by its row."""
    intruder = Actor(user=owner)
    with pytest.raises(DomainError) as refused:
        replica_job_submit(
            organization=other_org,
            model_version=stored_version,
            resource_class=_cpu(),
            actor=intruder,
        )
    assert "Not found." in json.dumps(refused.value.fields)
    assert not Job.objects.exists()


def test_a_version_no_recipe_made_or_without_its_files_is_not_served(
    org, owner, local_store, tmp_path, weights_bytes
):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights_bytes)
    uploaded = _register(org, owner, weights, {"any": "thing"}, name="uploaded", recipe="")
    with pytest.raises(DomainError, match="not trained by a recipe"):
        replica_job_submit(
            organization=org, model_version=uploaded, resource_class=_cpu(), actor=Actor(user=owner)
        )
    assert not Job.objects.exists()


def test_a_suspended_organization_starts_no_replica(org, owner, stored_version):
    Organization.objects.filter(pk=org.pk).update(status=Organization.Status.SUSPENDED)
    org.refresh_from_db()
    with pytest.raises(OrganizationRestricted):
        replica_job_submit(
            organization=org,
            model_version=stored_version,
            resource_class=_cpu(),
            actor=Actor(user=owner),
        )
    assert not Job.objects.exists()


def test_stopping_a_replica_drains_a_running_one_and_cancels_a_queued_one(
    org, owner, stored_version
):
    actor = Actor(user=owner)
    queued = replica_job_submit(
        organization=org, model_version=stored_version, resource_class=_cpu(), actor=actor
    )
    assert replica_job_stop(job=queued, actor=actor, reason="scaled in").state == "cancelled"
    running = JobFactory(organization=org, kind=Job.Kind.SERVE, state=JobState.RUNNING, attempt=1)
    stopped = replica_job_stop(job=running, actor=actor, reason="route changed")
    assert stopped.state == JobState.CANCELLING
    assert replica_job_stop(job=running, actor=actor, reason="again").state == "cancelling"
    assert AuditEvent.objects.filter(action="replica.stop", target_id=str(running.pk)).count() == 1
    with pytest.raises(ConflictError):
        replica_job_stop(job=JobFactory(organization=org), actor=actor, reason="not a replica")
    with pytest.raises(ConflictError, match="not retried"):
        job_retry(job=queued, actor=actor)


def _running_replica(org, started_ago: float) -> tuple[Job, JobAttempt]:
    worker = worker_register(name=f"cpu-{org.pk}", devices=[])
    job = JobFactory(
        organization=org,
        kind=Job.Kind.SERVE,
        input_dataset_version=None,
        state=JobState.RUNNING,
        attempt=1,
        worker=worker,
        max_runtime_s=0,
        lease_expires_at=timezone.now() + timedelta(seconds=30),
        serve_address="127.0.0.1:9999",
        serve_ready_at=timezone.now(),
    )
    attempt = JobAttempt.objects.create(
        organization=org,
        job=job,
        number=1,
        worker=worker,
        started_at=timezone.now() - timedelta(seconds=started_ago),
    )
    return job, attempt


def test_a_running_replica_is_billed_per_whole_interval_once_then_the_rest_at_its_end(
    org, settings
):
    settings.SERVE_BILLING_INTERVAL_S = 10
    PriceFactory(
        resource="gpu:cpu",
        unit_price="1.0000",
        effective_from=timezone.now() - timedelta(hours=1),  # over the seeded price
    )
    job, attempt = _running_replica(org, started_ago=35)
    attempt_bill_running(job_id=job.pk, attempt=1)
    attempt_bill_running(job_id=job.pk, attempt=1)  # a retry, or the next report: nothing new
    rows = UsageRecord.objects.filter(source_id=str(job.pk)).order_by("period_start")
    assert [row.idempotency_key.rpartition(":")[2] for row in rows] == ["0", "1", "2"]
    assert all(row.quantity == Decimal("10") for row in rows)
    assert rows[0].period_start == attempt.started_at
    # What the job's page shows counts the billed parts once: 36 s at $1 a second.
    job.refresh_from_db()
    assert job.cost_minor == 3000
    shown = job_cost_so_far(job=job, now=attempt.started_at + timedelta(seconds=36))
    assert abs(shown - 3600) <= 1

    finished = attempt_finish(job_id=job.pk, attempt=1, outcome="stopped", reason="stop")
    assert finished.serve_address == "" and finished.serve_ready_at is None
    rows = list(UsageRecord.objects.filter(source_id=str(job.pk)).order_by("period_start"))
    assert len(rows) == 4 and rows[-1].period_start == rows[-2].period_end
    attempt.refresh_from_db()
    held = Decimal(str(round((attempt.ended_at - attempt.started_at).total_seconds(), 3)))
    assert abs(sum(row.quantity for row in rows) - held) < Decimal("0.01")
    assert finished.cost_minor == sum(row.amount_minor for row in rows)


def test_a_lost_replica_is_requeued_without_its_address(org):
    job, _attempt = _running_replica(org, started_ago=5)
    Job.objects.filter(pk=job.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    assert reap_lost() == 1
    job.refresh_from_db()
    assert job.state == JobState.QUEUED and job.worker is None
    assert job.serve_address == "" and job.serve_ready_at is None
    assert job.waiting_reason.endswith("waiting to serve again on a machine with a free slot")


def test_a_draining_machine_moves_its_replicas_and_lets_its_other_jobs_finish(org):
    replica, _attempt = _running_replica(org, started_ago=5)
    training = JobFactory(
        organization=org, state=JobState.RUNNING, worker=replica.worker, attempt=1
    )
    assert replicas_move_off_draining() == 0
    worker_set_status(worker=replica.worker, status="draining")
    assert replicas_move_off_draining() == 1
    replica.refresh_from_db()
    training.refresh_from_db()
    assert (replica.state, training.state) == (JobState.PREEMPTED, JobState.RUNNING)


def test_only_the_current_attempt_of_a_running_replica_advertises_its_address(org):
    job, _attempt = _running_replica(org, started_ago=1)
    Job.objects.filter(pk=job.pk).update(serve_address="", serve_ready_at=None)
    with pytest.raises(StaleAttempt):
        attempt_advertise(job_id=job.pk, attempt=0, address="10.0.0.1:1")
    Job.objects.filter(pk=job.pk).update(state=JobState.CANCELLING)
    assert attempt_advertise(job_id=job.pk, attempt=1, address="10.0.0.1:1") is False
    Job.objects.filter(pk=job.pk).update(state=JobState.RUNNING)
    assert attempt_advertise(job_id=job.pk, attempt=1, address="10.0.0.1:2") is True
    job.refresh_from_db()
    assert job.serve_address == "10.0.0.1:2" and job.serve_ready_at is not None


def test_a_worker_refuses_a_replica_row_that_names_another_organizations_version(
    org, other_org, stored_version
):
    """Defence in depth: a job row written past admission still gets no other tenant's files."""
    worker = worker_register(name="cpu-defence", devices=[])
    job = JobFactory(
        organization=other_org,
        kind=Job.Kind.SERVE,
        input_dataset_version=None,
        input_model_version=stored_version,
        state=JobState.SCHEDULED,
        attempt=1,
        worker=worker,
        max_runtime_s=0,
        lease_expires_at=timezone.now() + timedelta(seconds=30),
    )
    JobAttempt.objects.create(organization=other_org, job=job, number=1, worker=worker)
    assert run_attempt(job_id=job.pk, attempt=1, worker_id=worker.pk) == "failed"
    job.refresh_from_db()
    assert job.state == JobState.FAILED and "belongs to another organization" in job.failure_reason
    assert job.serve_address == ""


# On a real pool worker


@pytest.fixture
def served_version(pool, org, owner, tmp_path):
    """A tabular classifier trained here in a second, registered in the pool's storage."""
    dataset = tmp_path / "churn.csv"
    write_tabular_sample(dataset, rows=300, seed=1)
    ctx = recipe_context(
        TabularClassifier,
        tmp_path,
        dataset,
        {"target": "label", "epochs": 2, "hidden_sizes": [8]},
        seed=1,
    )
    TabularClassifier().train(ctx)
    config = json.loads((ctx.output_dir / "config.json").read_text())
    version = _register(org, owner, ctx.output_dir / "model.safetensors", config)
    return version, _rows(dataset)


def _rows(dataset) -> list[dict]:
    return [
        {
            "age": int(row["age"]),
            "monthly_spend": float(row["monthly_spend"]) if row["monthly_spend"] else None,
            "tenure_months": int(row["tenure_months"]),
            "support_calls": int(row["support_calls"]),
            "plan": row["plan"],
            "region": row["region"],
        }
        for row in read_csv(dataset)[:5]
    ]


def _ready(job: Job) -> Job | None:
    job.refresh_from_db()
    if job.state in TERMINAL_STATES:
        raise AssertionError(f"the replica ended: {job.state} {job.failure_reason}")
    return job if job.state == JobState.RUNNING and job.serve_address else None


def _predict(job: Job, body, *, token: str | None = None) -> httpx.Response:
    token = token if token is not None else replica_token(job.pk, job.attempt)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"http://{job.serve_address}/predict",
        content=content,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        timeout=30,
    )


def _refuses_connections(address: str) -> bool:
    """True once the server no longer accepts: a connect is refused, or reset by a listener that
    closed while the connect waited in its backlog."""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return False
    except (ConnectionRefusedError, ConnectionResetError):
        return True


def _response(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@e2e
def test_a_replica_serves_its_version_over_http_is_billed_and_drains_when_stopped(
    pool, org, owner, served_version
):
    version, rows = served_version
    pool.start_worker("w1")
    submitted = time.monotonic()
    job = replica_job_submit(
        organization=org, model_version=version, resource_class=_cpu(), actor=Actor(user=owner)
    )
    try:
        wait_for(lambda: _ready(job), timeout=120, what="the replica to answer")
    except AssertionError:
        print(pool.logs())
        raise
    print(f"cold start, submit to ready: {time.monotonic() - submitted:.1f} s")
    address = job.serve_address

    answered = _predict(job, {"inputs": rows})
    assert answered.status_code == 200, answered.text
    outputs = answered.json()["outputs"]
    assert len(outputs) == len(rows)
    assert all(output["label"] in {"0", "1"} for output in outputs)
    assert all(set(output["probabilities"]) == {"0", "1"} for output in outputs)

    assert _predict(job, {"inputs": rows}, token="0" * 64).status_code == 401
    assert (
        _predict(job, {"inputs": rows}, token=replica_token(job.pk, job.attempt + 1)).status_code
        == 401
    )
    no_header = httpx.post(f"http://{address}/predict", json={"inputs": rows}, timeout=10)
    assert no_header.status_code == 401

    garbage = [
        (b"{not json", "must be JSON"),
        (b'{"inputs": [{"age": NaN}]}', "must be JSON"),
        (b'{"rows": []}', 'list "inputs"'),
        (json.dumps({"inputs": [{**rows[0], "age": "old"}]}).encode(), "column 'age'"),
        (json.dumps({"inputs": [rows[0], "x"]}).encode(), "inputs[1] must be an object"),
        (json.dumps({"inputs": [{"age": 10**400}]}).encode(), "must be JSON"),
    ]
    for body, detail in garbage:
        refused = _predict(job, body)
        assert refused.status_code == 400, (body, refused.text)
        assert detail in refused.json()["detail"] and "Traceback" not in refused.text
    too_many = _predict(job, {"inputs": rows * 30})
    assert too_many.status_code == 413 and "at most 100" in too_many.json()["detail"]

    wait_for(
        lambda: (
            UsageRecord.objects.filter(
                source_id=str(job.pk), idempotency_key__contains=":part:"
            ).count()
            >= 2
        ),
        timeout=30,
        what="serving time billed while the replica runs",
    )

    # A request in flight when the stop comes: its body arrives only after the server stopped
    # accepting connections, and it is answered all the same.
    body = json.dumps({"inputs": rows}).encode()
    token = replica_token(job.pk, job.attempt)
    slow = socket.create_connection(tuple(address.rsplit(":", 1)), timeout=30)
    slow.sendall(
        f"POST /predict HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body[:10]
    )
    wait_for(
        lambda: httpx.get(f"http://{address}/healthz", timeout=5).json()["in_flight"] == 1,
        timeout=10,
        what="the slow request to be in flight",
    )
    replica_job_stop(job=job, actor=Actor(user=owner), reason="route changed")
    wait_for(
        lambda: _refuses_connections(address), timeout=20, what="the replica to stop accepting"
    )
    job.refresh_from_db()
    assert job.state == JobState.CANCELLING
    slow.sendall(body[10:])
    status, drained = _response(slow)
    slow.close()
    assert status == 200 and len(drained["outputs"]) == len(rows)

    wait_for(lambda: _state(job) in TERMINAL_STATES, timeout=30, what="the replica's job to end")
    assert job.state == JobState.CANCELLED and job.failure_reason == ""
    assert job.serve_address == "" and job.serve_ready_at is None
    assert JobAttempt.objects.get(job=job).outcome == JobAttempt.Outcome.CANCELLED
    assert UsageRecord.objects.filter(idempotency_key=f"job:{job.pk}:attempt:1").exists()


def _state(job: Job) -> str:
    job.refresh_from_db()
    return job.state


@e2e
def test_a_replica_whose_worker_is_killed_is_placed_again_elsewhere_with_a_new_address(
    pool, org, owner, served_version
):
    version, rows = served_version
    labels = pool.start_workers("w1", "w2")
    job = replica_job_submit(
        organization=org, model_version=version, resource_class=_cpu(), actor=Actor(user=owner)
    )
    try:
        wait_for(lambda: _ready(job), timeout=120, what="the replica to answer")
    except AssertionError:
        print(pool.logs())
        raise
    first_attempt, first_address, first_worker = job.attempt, job.serve_address, job.worker.name
    label = labels[first_worker]
    doomed = descendants(pool.processes[label].pid) | {pool.processes[label].pid}
    pool.kill(label)
    wait_for(lambda: not alive(doomed), timeout=10, what="the killed worker's processes to die")

    try:
        wait_for(
            lambda: _ready(job) and job.attempt > first_attempt,
            timeout=120,
            what="the replica to be placed again and answer",
        )
    except AssertionError:
        print(pool.logs())
        raise
    assert job.worker.name != first_worker
    assert job.serve_address != first_address or not _refuses_connections(job.serve_address)
    answered = _predict(job, {"inputs": rows})
    assert answered.status_code == 200 and len(answered.json()["outputs"]) == len(rows)
    stale_token = replica_token(job.pk, first_attempt)
    assert _predict(job, {"inputs": rows}, token=stale_token).status_code == 401
    ran = [a for a in JobAttempt.objects.filter(job=job).order_by("number") if a.started_at]
    assert [a.outcome for a in ran] == [JobAttempt.Outcome.LOST, JobAttempt.Outcome.ACTIVE]
    replica_job_stop(job=job, actor=Actor(user=owner), reason="test over")
    wait_for(lambda: _state(job) in TERMINAL_STATES, timeout=30, what="the replica to stop")


def _child_of(pool, label: str) -> int:
    """The job's child under the worker: of the processes there that run the child's code (the
    zygote and the children it forked, all with its command line), the one that has moved into
    an attempt's folder; the zygote and a child waiting for its job stay in /."""
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True)
    children = {
        int(pid)
        for pid, _, args in (line.strip().partition(" ") for line in ps.stdout.splitlines())
        if "jobs.runner.child" in args
    }
    [child] = {pid for pid in children & descendants(pool.processes[label].pid) if _moved_in(pid)}
    return child


def _moved_in(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/cwd") != "/"
    except FileNotFoundError:  # ended meanwhile
        return False


@e2e
def test_a_replica_that_stops_answering_its_health_checks_is_killed(
    pool, org, owner, served_version
):
    version, _rows = served_version
    pool.start_worker("w1")
    job = replica_job_submit(
        organization=org, model_version=version, resource_class=_cpu(), actor=Actor(user=owner)
    )
    try:
        wait_for(lambda: _ready(job), timeout=120, what="the replica to answer")
    except AssertionError:
        print(pool.logs())
        raise
    frozen = _child_of(pool, "w1")
    os.kill(frozen, signal.SIGSTOP)  # hung: alive, its port open, answering nothing
    wait_for(lambda: _state(job) in TERMINAL_STATES, timeout=60, what="the hung replica to end")
    assert job.state == JobState.FAILED
    assert "did not answer its health checks" in job.failure_reason
    assert job.serve_address == "" and not alive({frozen})
