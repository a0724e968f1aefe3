"""Keeping each routed version's replicas between the deployment's min and max: the periodic
reconciler, and the cold start a request asks for when no replica is ready.

Replicas are serve jobs: jobs places, runs, bills and stops them (jobs/services/replicas.py);
this module only decides how many, follows their jobs' states, and health-checks ready ones.
One pass at a time across processes (a PostgreSQL advisory lock, as the scheduler's tick); the
health checks run outside that transaction, since no network call runs in an open transaction.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import httpx
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from jobs.models import Job, JobState
from jobs.services import replicas as replica_jobs
from tenants.actors import Actor
from tenants.errors import DomainError

from . import counters
from .models import Deployment, LoopEvent, Replica, Route

logger = logging.getLogger(__name__)

RECONCILE_LOCK_KEY = 0x5E4E
SYSTEM = Actor()
_ACTIVE = (Replica.State.STARTING, Replica.State.READY)


@dataclass
class Pass:
    started: list[int] = field(default_factory=list)  # replica ids
    stopped: list[int] = field(default_factory=list)
    ready: list[int] = field(default_factory=list)
    requeued: list[int] = field(default_factory=list)


def _try_lock() -> bool:
    if connection.vendor != "postgresql":
        return True
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [RECONCILE_LOCK_KEY])
        return cursor.fetchone()[0]


def _event(replica: Replica, kind: str, message: str, **data) -> None:
    LoopEvent.objects.create(
        organization_id=replica.organization_id,
        deployment_id=replica.deployment_id,
        kind=kind,
        message=message,
        data=data,
        job_id=replica.job_id,
        model_version_id=replica.model_version_id,
    )


def replica_start(*, deployment: Deployment, model_version, reason: str) -> Replica:
    """Submit a serve job for one more replica of `model_version` and record it as starting."""
    job = replica_jobs.replica_job_submit(
        organization=deployment.organization,
        model_version=model_version,
        resource_class=deployment.resource_class,
        actor=SYSTEM,
        labels={"deployment": deployment.name, "model_version": str(model_version.pk)},
    )
    replica = Replica.objects.create(
        organization=deployment.organization,
        deployment=deployment,
        model_version=model_version,
        job=job,
    )
    _event(
        replica, LoopEvent.Kind.REPLICA_STARTED, f"replica {replica.pk} ({reason})", reason=reason
    )
    return replica


def replica_stop(*, replica: Replica, reason: str) -> None:
    """Ask jobs to drain and stop the replica's serve job, once (drain_started_at marks it)."""
    replica.state = Replica.State.DRAINING
    replica.drain_started_at = timezone.now()
    replica.save(update_fields=["state", "drain_started_at"])
    if not replica.job.is_terminal:
        try:
            replica_jobs.replica_job_stop(job=replica.job, actor=SYSTEM, reason=reason)
        except DomainError:  # already stopping or stopped: the next pass sees it terminal
            logger.info("replica %s: job %s not stoppable now", replica.pk, replica.job_id)
    _event(
        replica, LoopEvent.Kind.REPLICA_STOPPED, f"replica {replica.pk} ({reason})", reason=reason
    )


@transaction.atomic
def cold_start(*, deployment: Deployment, model_version) -> Replica | None:
    """A request found no ready replica: start one now unless one is already starting (or the
    deployment is at its max), rather than wait for the next reconcile pass."""
    # FOR NO KEY UPDATE, as every lock that only serializes work on a deployment: a plain FOR
    # UPDATE also blocks the key-share lock each insert referencing the deployment takes (a
    # reconciler pass writing a timeline row while it holds the quota row for its own start),
    # and the two deadlock on the quota row.
    deployment = Deployment.objects.select_for_update(no_key=True).get(pk=deployment.pk)
    replicas = Replica.objects.for_organization(deployment.organization).filter(
        deployment=deployment, state__in=_ACTIVE
    )
    if replicas.filter(model_version=model_version, state=Replica.State.STARTING).exists():
        return None
    if replicas.filter(model_version=model_version).count() >= deployment.max_replicas:
        return None
    return replica_start(deployment=deployment, model_version=model_version, reason="cold start")


def _follow_job(replica: Replica, job: Job, now, done: Pass) -> None:
    """Bring the replica's state in line with its job's."""
    if job.is_terminal:
        replica.state, replica.stopped_at = Replica.State.STOPPED, now
        replica.save(update_fields=["state", "stopped_at"])
        counters.health_passed(replica.pk)
        done.stopped.append(replica.pk)
        return
    if replica.state == Replica.State.DRAINING:
        if replica.drain_started_at is None:
            replica_stop(replica=replica, reason="no longer routed")
        return
    serving = job.state == JobState.RUNNING and job.serve_ready_at and job.serve_address
    if replica.state == Replica.State.STARTING and serving:
        replica.state, replica.ready_at = Replica.State.READY, now
        replica.save(update_fields=["state", "ready_at"])
        done.ready.append(replica.pk)
    elif replica.state == Replica.State.READY and not serving:
        # Its worker was lost and the job queued again: it is starting once more, elsewhere.
        replica.state, replica.ready_at = Replica.State.STARTING, None
        replica.save(update_fields=["state", "ready_at"])
        done.requeued.append(replica.pk)


def _wanted(deployment: Deployment, route: Route, now) -> int:
    """How many replicas a route's version should have: enough for its requests in flight at
    target_in_flight each, within min and max; with min 0, one while requests came within
    scale_to_zero_after_s; a shadow route at weight 0 none."""
    if route.mode == Route.Mode.SHADOW and route.weight == 0:
        return 0
    in_flight = counters.version_in_flight(
        deployment_id=deployment.pk, version_id=route.model_version_id
    )
    needed = math.ceil(in_flight / max(1, deployment.target_in_flight))
    recent = deployment.last_request_at is not None and (
        (now - deployment.last_request_at).total_seconds() < deployment.scale_to_zero_after_s
    )
    if recent:
        needed = max(needed, 1)
    return max(deployment.min_replicas, min(deployment.max_replicas, needed))


def _scale(deployment: Deployment, replicas: list[Replica], now, done: Pass) -> None:
    routes = list(
        Route.objects.for_organization(deployment.organization)
        .filter(deployment=deployment)
        .select_related("model_version")
    )
    routed = {route.model_version_id for route in routes}
    for replica in replicas:
        if replica.state in _ACTIVE and replica.model_version_id not in routed:
            replica_stop(replica=replica, reason="no longer routed")
            done.stopped.append(replica.pk)
    for route in routes:
        active = [
            r
            for r in replicas
            if r.model_version_id == route.model_version_id and r.state in _ACTIVE
        ]
        wanted = _wanted(deployment, route, now)
        for _ in range(wanted - len(active)):
            started = replica_start(
                deployment=deployment, model_version=route.model_version, reason="scale up"
            )
            done.started.append(started.pk)
        if len(active) > wanted:
            # One at a time, the newest starting one first: a burst's end should not drop
            # every replica at once while in-flight counts settle.
            active.sort(key=lambda r: (r.state != Replica.State.STARTING, -r.pk))
            replica_stop(replica=active[0], reason="scale down")
            done.stopped.append(active[0].pk)


def replicas_reconcile() -> Pass | None:
    """One pass over every deployment; None when another pass holds the lock."""
    done = Pass()
    with transaction.atomic():
        if not _try_lock():
            return None
        now = timezone.now()
        live = Replica.objects.exclude(state=Replica.State.STOPPED).select_related("job")
        by_deployment: dict[int, list[Replica]] = {}
        for replica in live.select_for_update(of=("self",)):
            _follow_job(replica, replica.job, now, done)
            by_deployment.setdefault(replica.deployment_id, []).append(replica)
        for deployment in Deployment.objects.select_related("organization", "resource_class"):
            _scale(deployment, by_deployment.get(deployment.pk, []), now, done)
    _health_check(done)
    return done


def _health_check(done: Pass) -> None:
    """GET /healthz of every ready replica; one that fails SERVING_HEALTH_FAILURES checks in a
    row is stopped (its job's lease would catch a dead worker, not a wedged server)."""
    ready = list(
        Replica.objects.filter(state=Replica.State.READY).values_list("pk", "job__serve_address")
    )
    timeout = httpx.Timeout(settings.SERVING_CONNECT_TIMEOUT_S)
    failing = []
    with httpx.Client(timeout=timeout) as http:
        for replica_id, address in ready:
            try:
                ok = http.get(f"http://{address}/healthz").status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                counters.health_passed(replica_id)
            elif counters.health_failed(replica_id) >= settings.SERVING_HEALTH_FAILURES:
                failing.append(replica_id)
    for replica_id in failing:
        with transaction.atomic():
            replica = (
                Replica.objects.select_for_update()
                .select_related("job")
                .filter(pk=replica_id, state=Replica.State.READY)
                .first()
            )
            if replica is not None:
                replica_stop(replica=replica, reason="failed health checks")
                done.stopped.append(replica_id)
