"""The reconciler against the real database, Redis and real HTTP replicas.

replica_job_submit and replica_job_stop are another helper's, unfinished on this branch: they
are replaced here (only here and in the cold-start test) by functions that record the call and
do what their contracts say to the job row (a queued serve job; a cancelled one)."""

from datetime import timedelta

import psycopg
import pytest
from django.conf import settings as django_settings
from django.core.cache import cache
from django.utils import timezone

from jobs.models import Job, JobState
from jobs.services import replicas as replica_jobs
from serving import counters
from serving.models import Deployment, LoopEvent, PredictionLog, Replica
from serving.reconciler import RECONCILE_LOCK_KEY, replicas_reconcile
from serving.services import prediction_log_expire
from tests.factories import JobFactory

from .replicas import ready_replica


@pytest.fixture
def pool(monkeypatch):
    calls = {"submitted": [], "stopped": []}

    def submit(*, organization, model_version, resource_class, actor, labels=None):
        calls["submitted"].append(model_version.pk)
        return JobFactory(organization=organization, kind=Job.Kind.SERVE, labels=labels or {})

    def stop(*, job, actor, reason):
        calls["stopped"].append(job.pk)
        Job.objects.filter(pk=job.pk).update(state=JobState.CANCELLED)

    monkeypatch.setattr(replica_jobs, "replica_job_submit", submit)
    monkeypatch.setattr(replica_jobs, "replica_job_stop", stop)
    return calls


def _states(deployment):
    return sorted(Replica.objects.filter(deployment=deployment).values_list("state", flat=True))


def test_min_replicas_are_started_and_become_ready_when_their_job_serves(
    org, make_deployment, pool
):
    deployment, (v,) = make_deployment(org, min_replicas=2, max_replicas=3)
    replicas_reconcile()
    assert pool["submitted"] == [v.pk, v.pk]
    assert _states(deployment) == ["starting", "starting"]
    assert LoopEvent.objects.filter(kind=LoopEvent.Kind.REPLICA_STARTED).count() == 2
    replicas_reconcile()
    assert len(pool["submitted"]) == 2  # starting ones count
    Job.objects.filter(replica__deployment=deployment).update(
        state=JobState.RUNNING, serve_address="127.0.0.1:1", serve_ready_at=timezone.now()
    )
    replicas_reconcile()
    assert _states(deployment) == ["ready", "ready"]


def test_in_flight_requests_scale_up_to_max_then_down_one_at_a_time(
    org, make_deployment, pool, fakes
):
    deployment, (v,) = make_deployment(org, min_replicas=1, max_replicas=3, target_in_flight=2)
    ready_replica(deployment, v, fakes("a"))
    replica = Replica.objects.get(deployment=deployment)
    key = counters._version_key(deployment.pk, v.pk)
    cache.set(key, 9)  # needs 5 at 2 each: capped at 3
    replicas_reconcile()
    assert len(pool["submitted"]) == 2
    cache.set(key, 0)
    replicas_reconcile()
    assert len(pool["stopped"]) == 1  # one per pass
    replicas_reconcile()
    assert len(pool["stopped"]) == 2
    replicas_reconcile()
    assert Replica.objects.get(pk=replica.pk).state == Replica.State.READY  # min 1 kept
    assert _states(deployment).count("stopped") == 2


def test_scale_to_zero_after_the_quiet_period_and_not_before(org, make_deployment, pool, fakes):
    deployment, (v,) = make_deployment(org, min_replicas=0, scale_to_zero_after_s=600)
    ready_replica(deployment, v, fakes("a"))
    Deployment.objects.filter(pk=deployment.pk).update(
        last_request_at=timezone.now() - timedelta(seconds=300)
    )
    replicas_reconcile()
    assert _states(deployment) == ["ready"]
    Deployment.objects.filter(pk=deployment.pk).update(
        last_request_at=timezone.now() - timedelta(seconds=601)
    )
    replicas_reconcile()
    assert len(pool["stopped"]) == 1
    replicas_reconcile()
    assert _states(deployment) == ["stopped"]
    assert LoopEvent.objects.filter(kind=LoopEvent.Kind.REPLICA_STOPPED).exists()


def test_replicas_no_longer_routed_are_stopped_once(org, make_deployment, pool, fakes):
    deployment, (v,) = make_deployment(org)
    replica = ready_replica(deployment, v, fakes("a"))
    Replica.objects.filter(pk=replica.pk).update(state=Replica.State.DRAINING)
    Job.objects.filter(pk=replica.job_id).update(state=JobState.RUNNING)
    replicas_reconcile()
    assert pool["stopped"] == [replica.job_id]
    replicas_reconcile()
    assert pool["stopped"] == [replica.job_id]  # asked once
    assert Replica.objects.get(pk=replica.pk).state == Replica.State.STOPPED


def test_a_requeued_job_puts_its_replica_back_to_starting(org, make_deployment, pool, fakes):
    deployment, (v,) = make_deployment(org, min_replicas=1)
    replica = ready_replica(deployment, v, fakes("a"))
    Job.objects.filter(pk=replica.job_id).update(
        state=JobState.QUEUED, serve_address="", serve_ready_at=None
    )
    replicas_reconcile()
    replica.refresh_from_db()
    assert replica.state == Replica.State.STARTING
    assert not pool["submitted"]  # the job itself is placed again by the scheduler


def test_a_replica_failing_health_checks_is_stopped(org, make_deployment, pool, fakes, settings):
    settings.SERVING_HEALTH_FAILURES = 2
    deployment, (v,) = make_deployment(org, min_replicas=2, max_replicas=2)
    sick = ready_replica(deployment, v, fakes("sick", status=500))
    well = ready_replica(deployment, v, fakes("well"))
    replicas_reconcile()
    assert not pool["stopped"]
    replicas_reconcile()
    assert pool["stopped"] == [sick.job_id]
    assert Replica.objects.get(pk=well.pk).state == Replica.State.READY


def test_a_second_pass_does_nothing_while_another_holds_the_lock(org, make_deployment, pool):
    """The advisory lock, held by another connection (as another beat's pass would)."""
    make_deployment(org, min_replicas=1)
    db = django_settings.DATABASES["default"]
    with psycopg.connect(
        host=db["HOST"], port=db["PORT"], user=db["USER"], dbname=db["NAME"], autocommit=False
    ) as other:
        other.execute("SELECT pg_advisory_xact_lock(%s)", [RECONCILE_LOCK_KEY])
        assert replicas_reconcile() is None
        assert not pool["submitted"]
    assert replicas_reconcile() is not None
    assert pool["submitted"]


def test_retention_deletes_old_rows_in_batches(org, make_deployment):
    deployment, (v,) = make_deployment(org, log_retention_days=7)
    for age in (1, 8, 9, 10, 30):
        row = PredictionLog.objects.create(
            organization=org, deployment=deployment, model_version=v, inputs={}, latency_ms=1
        )
        PredictionLog.objects.filter(pk=row.pk).update(
            created_at=timezone.now() - timedelta(days=age)
        )
    assert prediction_log_expire(batch=2) == 4
    assert PredictionLog.objects.count() == 1
