"""The request path of a deployment: pick a live route by weight (sticky per routing key), forward
to the least busy ready replica of that version with a pooled keep-alive client, log and meter
the answer; queue a copy of the request for shadow routes, which the control plane sends.

The web process never loads a model: it authenticates, picks and forwards. Every prediction gets
its own id, returned beside its output, which feedback later labels.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import httpx
from celery import current_app
from django.conf import settings
from django.core.cache import cache
from django.db import transaction
from django.http import Http404
from django.utils import timezone

from jobs.models import Job, JobState
from jobs.services.replicas import replica_token
from tenants.actors import Actor
from tenants.errors import DomainError

from . import counters
from .metering import idempotency_key_check, prediction_charge
from .metrics import prediction_observed
from .models import Deployment, PredictionLog, Replica, Route
from .reconciler import cold_start
from .services import DeploymentNotRouted

logger = logging.getLogger(__name__)

# The replicas' own limit (jobs.runner.parent hands it to each): more would travel to a replica
# only to be refused there, and reach the caller as a 502 instead of this clear 400.
MAX_INPUTS = settings.ONLINE_PREDICTION_MAX_ROWS
# Deeper inputs fit no recipe's contract, and would cost the JSON encoders their stack.
MAX_INPUT_DEPTH = 20
ROUTING_KEY_MAX = 200


class NoReadyReplica(DomainError):
    code = "no_ready_replica"
    status = 503

    def __init__(self, detail: str, *, retry_after: int):
        super().__init__(detail)
        self.retry_after = retry_after


class ReplicaUnavailable(DomainError):
    """The replica did not answer in time or could not be reached."""

    code = "replica_unavailable"
    status = 503

    def __init__(self, detail: str, *, retry_after: int = 1):
        super().__init__(detail)
        self.retry_after = retry_after


class ReplicaUnreachable(ReplicaUnavailable):
    """No connection to the replica could be made, or the address answered as another replica
    (it refused this attempt's token: the replica moved and something else listens there):
    nothing was answered, so sending elsewhere is safe."""


class ReplicaFailed(DomainError):
    """The replica answered, but with an error or an answer outside its contract."""

    code = "replica_error"
    status = 502


class InputsRejected(DomainError):
    code = "inputs_rejected"


_http: httpx.Client | None = None
_http_lock = threading.Lock()


def http_client() -> httpx.Client:
    """One pooled keep-alive client per web process, shared by its threads (httpx.Client is
    thread-safe), so a forward reuses an open connection to the replica. httpx writes a request's
    headers and body separately: without TCP_NODELAY the body would wait for the replica's
    delayed ACK of the headers."""
    global _http
    if _http is not None:
        return _http
    with _http_lock:
        if _http is None:
            size = settings.SERVING_POOL_CONNECTIONS
            _http = httpx.Client(
                timeout=httpx.Timeout(
                    settings.SERVING_FORWARD_TIMEOUT_S, connect=settings.SERVING_CONNECT_TIMEOUT_S
                ),
                transport=httpx.HTTPTransport(
                    limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
                    socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
                ),
            )
        return _http


def _bucket(routing_key: str | None, deployment_id: int) -> int:
    """0..99: from the routing key's hash (the same key, the same bucket) or at random."""
    if routing_key is None:
        return secrets.randbelow(100)
    digest = hashlib.sha256(f"{deployment_id}:{routing_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100


def route_pick(routes: list[Route], bucket: int) -> Route:
    """The live route whose share of 0..99 holds `bucket`, routes in a fixed order (by id) so a
    bucket keeps its version while the weights stand."""
    live = sorted((r for r in routes if r.mode == Route.Mode.LIVE), key=lambda r: r.pk)
    edge = 0
    for route in live:
        edge += route.weight
        if bucket < edge:
            return route
    return live[-1]


@dataclass(frozen=True)
class Target:
    replica_id: int
    job_id: int
    address: str
    attempt: int


def _targets(deployment: Deployment) -> dict[int, list[Target]]:
    """Per routed version, the replicas whose serve job answers now (as jobs.selectors.
    replica_endpoints defines it), in one query. A starting replica whose job already serves is
    one: the first request after a cold start need not wait for the reconciler's next pass to
    mark it ready."""
    rows = (
        Replica.objects.for_organization(deployment.organization)
        .filter(
            deployment=deployment,
            state__in=(Replica.State.STARTING, Replica.State.READY),
            job__kind=Job.Kind.SERVE,
            job__state=JobState.RUNNING,
        )
        .exclude(job__serve_address="")
        .values_list("model_version_id", "pk", "job_id", "job__serve_address", "job__attempt")
    )
    targets: dict[int, list[Target]] = {}
    for version_id, *target in rows:
        targets.setdefault(version_id, []).append(Target(*target))
    return targets


@dataclass(frozen=True)
class Routing:
    """What a request needs to know of a deployment: the row, its routes (with their versions'
    names) and the replicas answering per version, as read at `read_at` (`clock`)."""

    deployment: Deployment
    routes: tuple[Route, ...]
    targets: dict[int, list[Target]]
    read_at: float


def clock() -> float:
    """The routing cache's clock (tests move it on)."""
    return time.monotonic()


# Per web process (each gunicorn worker its own), keyed by (organization id, deployment name);
# an entry is used for SERVING_ROUTING_CACHE_S. Plain dict operations are atomic under the GIL.
_routings: dict[tuple[int, str], Routing] = {}
ROUTINGS_MAX = 10_000


def routing_read(*, organization, name: str, fresh: bool = False) -> tuple[Routing, bool]:
    """The deployment `name` of `organization` as a request routes it (Http404 when there is
    none), and whether it came from this process's cache: read at most every
    SERVING_ROUTING_CACHE_S per web process, which saves every predict three queries. So a change
    of routes, weights or replicas reaches a web process within that time; a request whose cached
    replica no longer answers reads again at once (`predict`)."""
    key = (organization.pk, name)
    ttl = settings.SERVING_ROUTING_CACHE_S
    cached = _routings.get(key)
    if not fresh and cached is not None and clock() - cached.read_at < ttl:
        return cached, True
    deployment = Deployment.objects.for_organization(organization).filter(name=name).first()
    if deployment is None:
        _routings.pop(key, None)
        raise Http404
    deployment.organization = organization
    routing = Routing(deployment, tuple(_routes(deployment)), _targets(deployment), clock())
    if ttl > 0:
        if len(_routings) >= ROUTINGS_MAX:
            _routings.clear()
        _routings[key] = routing
    return routing, False


def _pick(routing: Routing, bucket: int) -> tuple[Route, list[Target]]:
    """The live route holding `bucket`, and its version's answering replicas (maybe none)."""
    if not any(r.mode == Route.Mode.LIVE for r in routing.routes):
        raise DeploymentNotRouted(
            f"Deployment {routing.deployment.name} has no live route; set its routes first."
        )
    route = route_pick(routing.routes, bucket)
    return route, routing.targets.get(route.model_version_id, [])


def _least_busy(targets: list[Target]) -> Target:
    if len(targets) == 1:
        return targets[0]
    load = counters.replicas_in_flight([t.replica_id for t in targets])
    lowest = min(load.values())
    return secrets.choice([t for t in targets if load[t.replica_id] == lowest])


def _forward(target: Target, inputs: list) -> list:
    try:
        response = http_client().post(
            f"http://{target.address}/predict",
            json={"inputs": inputs},
            headers={"Authorization": f"Bearer {replica_token(target.job_id, target.attempt)}"},
        )
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise ReplicaUnreachable("The model could not be reached; try again shortly.") from exc
    except httpx.TimeoutException as exc:
        raise ReplicaUnavailable("The model did not answer in time; try again.") from exc
    except httpx.HTTPError as exc:
        raise ReplicaUnavailable("The model could not be reached; try again shortly.") from exc
    if response.status_code == 401:
        raise ReplicaUnreachable("The model could not be reached; try again shortly.")
    if response.status_code == 400:
        try:
            detail = str(response.json().get("detail", ""))[:500]
        except ValueError:
            detail = ""
        raise InputsRejected(
            f"The model cannot read these inputs: {detail or 'no reason given'}",
            fields={"inputs": [detail or "Not readable by this model."]},
        )
    if response.status_code != 200:
        raise ReplicaFailed(f"The model answered with an error ({response.status_code}).")
    try:
        outputs = response.json()["outputs"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ReplicaFailed("The model's answer was not readable.") from exc
    if not isinstance(outputs, list) or len(outputs) != len(inputs):
        raise ReplicaFailed("The model answered a different number of outputs than inputs.")
    return outputs


def _sampled(prediction_id: uuid.UUID, rate: float) -> bool:
    """The same answer for the same id in every process: the log keeps a stable sample."""
    if rate >= 1:
        return True
    digest = hashlib.sha256(prediction_id.bytes).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


def _log(
    deployment: Deployment,
    version_id: int,
    mode: str,
    inputs: list,
    outputs: list | None,
    ids: list[uuid.UUID],
    latency_ms: float,
    error: str = "",
) -> None:
    now = timezone.now()
    rows = [
        PredictionLog(
            organization_id=deployment.organization_id,
            deployment_id=deployment.pk,
            model_version_id=version_id,
            mode=mode,
            prediction_id=prediction_id,
            inputs=item,
            output=outputs[i] if outputs is not None else None,
            error=error[:200],
            latency_ms=latency_ms,
            created_at=now,
        )
        for i, (prediction_id, item) in enumerate(zip(ids, inputs, strict=True))
        if _sampled(prediction_id, deployment.log_sample_rate)
    ]
    PredictionLog.objects.bulk_create(rows)


def _call(
    deployment: Deployment,
    version_id: int,
    mode: str,
    inputs: list,
    targets: list[Target],
    *,
    stale: bool = False,
) -> tuple:
    """Forward to the least busy target under fresh ids; a failure is logged here, an answer
    by the caller (`log`), which may find a concurrent retry's answer to give instead. A
    `stale` target (from a routing read a while ago) that cannot be reached is not the model's
    failure, and is not logged: the caller reads again and retries."""
    target = _least_busy(targets)
    ids = [uuid.uuid4() for _ in inputs]
    started = time.perf_counter()
    touch_due = False
    try:
        with counters.in_flight(
            deployment_id=deployment.pk,
            version_id=version_id,
            replica_id=target.replica_id,
            touch=mode == Route.Mode.LIVE,
        ) as touch_due:
            outputs = _forward(target, inputs)
        latency = (time.perf_counter() - started) * 1000
    except (ReplicaUnavailable, ReplicaFailed) as exc:
        if stale and isinstance(exc, ReplicaUnreachable):
            raise
        latency = (time.perf_counter() - started) * 1000
        prediction_observed(
            deployment=deployment, mode=mode, outcome=exc.code, seconds=latency / 1000
        )
        _log(deployment, version_id, mode, inputs, None, ids, latency, error=exc.code)
        raise
    finally:
        if touch_due:
            _touch(deployment)

    prediction_observed(deployment=deployment, mode=mode, outcome="ok", seconds=latency / 1000)

    def log():
        _log(deployment, version_id, mode, inputs, outputs, ids, latency)

    return ids, outputs, log


def _shadow_offer(deployment: Deployment, route: Route, inputs: list) -> None:
    """Queue a copy of the request for a shadow route; the control plane sends it
    (`shadow_drain`), so the web process spends one Redis round trip on it and the live answer
    never waits for it. Without Redis (the embedded default) the copy goes as a Celery task."""
    copy = {"deployment": deployment.pk, "version": route.model_version_id, "inputs": inputs}
    try:
        if counters.shadow_push(deployment.pk, json.dumps(copy)) is None:
            current_app.send_task("serving.shadow_send", args=[[copy]])
    except Exception:  # a copy must never fail the live answer it rides on
        logger.warning("could not queue a shadow copy", exc_info=True)
        with contextlib.suppress(Exception):
            counters.shadow_dropped(deployment.pk)


def shadow_send(copies: list[dict]) -> int:
    """Send queued shadow copies to their versions' replicas; each answer is logged as a shadow
    prediction of its version and goes nowhere else. A copy for a version that is no longer a
    shadow route, or has no answering replica, is skipped (the reconciler starts them). Returns
    how many were sent."""
    by_deployment: dict[int, list[dict]] = {}
    for copy in copies:
        by_deployment.setdefault(copy["deployment"], []).append(copy)
    sent = 0
    for deployment_id, items in by_deployment.items():
        deployment = (
            Deployment.objects.select_related("organization").filter(pk=deployment_id).first()
        )
        if deployment is None:
            continue
        shadows = {r.model_version_id for r in _routes(deployment) if r.mode == Route.Mode.SHADOW}
        targets = _targets(deployment)
        for copy in items:
            if copy["version"] not in shadows or not targets.get(copy["version"]):
                continue
            # A failing shadow replica is logged as an error prediction of its version.
            with contextlib.suppress(DomainError):
                _ids, _outputs, log = _call(
                    deployment,
                    copy["version"],
                    Route.Mode.SHADOW,
                    copy["inputs"],
                    targets[copy["version"]],
                )
                log()
            sent += 1
    return sent


def shadow_drain(*, budget_s: float, per_queue: int = 100) -> int:
    """Send queued shadow copies until the queues are empty or `budget_s` has passed (beat runs
    this every SERVING_SHADOW_DRAIN_S on the control plane); returns how many were sent."""
    deadline = time.monotonic() + budget_s
    sent = 0
    while time.monotonic() < deadline:
        copies = counters.shadow_pop(per_queue=per_queue)
        if not copies:
            break
        sent += shadow_send([json.loads(copy) for copy in copies])
    return sent


def _too_deep(value, limit: int) -> bool:
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            pending.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            pending.extend((v, depth + 1) for v in item)
    return False


def _touch(deployment: Deployment) -> None:
    """Scale to zero reads last_request_at; at most one request per SERVING_LAST_REQUEST_EVERY_S
    writes it (counters.touch_due)."""
    Deployment.objects.filter(pk=deployment.pk).update(last_request_at=timezone.now())


def _idempotency_cache_key(deployment: Deployment, idempotency_key: str, inputs: list) -> str:
    request = json.dumps({"key": idempotency_key, "inputs": inputs}, sort_keys=True, default=str)
    return f"serving:idem:{deployment.pk}:{hashlib.sha256(request.encode()).hexdigest()}"


def _routes(deployment: Deployment) -> list[Route]:
    return list(
        Route.objects.for_organization(deployment.organization)
        .filter(deployment=deployment)
        .select_related("model_version__registered_model")
    )


def predict(
    *,
    organization,
    name: str,
    inputs: list,
    actor: Actor,
    routing_key: str | None = None,
    idempotency_key: str | None = None,
) -> dict:
    """Answer `inputs` from one live version of `organization`'s deployment `name`:
    {"deployment", "model_version": {"id", "name", "number"},
     "predictions": [{"prediction_id", "output"}, ...]} in input order.

    A retry with the same Idempotency-Key and inputs within IDEMPOTENCY_WINDOW_S gets the first
    answer again, and is billed once.
    """
    idempotency_key_check(idempotency_key)
    if routing_key is not None and len(routing_key) > ROUTING_KEY_MAX:
        raise DomainError(
            "The X-Routing-Key header is too long.",
            fields={"routing_key": [f"At most {ROUTING_KEY_MAX} characters."]},
        )
    if not isinstance(inputs, list) or not 1 <= len(inputs) <= MAX_INPUTS:
        raise DomainError(
            f"Send 1 to {MAX_INPUTS} inputs.", fields={"inputs": [f"1 to {MAX_INPUTS} items."]}
        )
    if _too_deep(inputs, MAX_INPUT_DEPTH + 1):
        raise DomainError(
            "The inputs are nested too deeply.",
            fields={"inputs": [f"At most {MAX_INPUT_DEPTH} levels of lists and objects."]},
        )
    routing, cached = routing_read(organization=organization, name=name)
    deployment = routing.deployment
    remembered = None
    if idempotency_key:
        remembered = _idempotency_cache_key(deployment, idempotency_key, inputs)
        answer = cache.get(remembered)
        if answer is not None:
            return answer
    bucket = _bucket(routing_key, deployment.pk)
    route, targets = _pick(routing, bucket)
    if cached and not targets:  # read a while ago: a replica may have become ready since
        routing, cached = routing_read(organization=organization, name=name, fresh=True)
        route, targets = _pick(routing, bucket)
    if not targets:
        if counters.touch_due(deployment.pk):  # a cold start's callers keep it from zero
            _touch(deployment)
        cold_start(deployment=deployment, model_version=route.model_version)
        raise NoReadyReplica(
            f"Deployment {deployment.name} is starting a replica of the model; retry shortly.",
            retry_after=settings.SERVING_COLD_START_RETRY_AFTER_S,
        )
    try:
        try:
            ids, outputs, log = _call(
                deployment, route.model_version_id, Route.Mode.LIVE, inputs, targets, stale=cached
            )
        except ReplicaUnreachable:
            if not cached:
                raise
            # The replica read a while ago is gone (drained, stopped, its worker lost): read
            # again and send to what answers now, or to nothing.
            routing, cached = routing_read(organization=organization, name=name, fresh=True)
            route, targets = _pick(routing, bucket)
            if not targets:
                raise
            ids, outputs, log = _call(
                deployment, route.model_version_id, Route.Mode.LIVE, inputs, targets
            )
    finally:
        for shadow in routing.routes:
            if shadow.mode == Route.Mode.SHADOW and _bucket(None, deployment.pk) < shadow.weight:
                _shadow_offer(deployment, shadow, inputs)
    version = route.model_version
    answer = {
        "deployment": deployment.name,
        "model_version": {
            "id": version.pk,
            "name": version.registered_model.name,
            "number": version.number,
        },
        "predictions": [
            {"prediction_id": str(prediction_id), "output": output}
            for prediction_id, output in zip(ids, outputs, strict=True)
        ],
    }
    if remembered is not None and not cache.add(
        remembered, answer, timeout=settings.IDEMPOTENCY_WINDOW_S
    ):
        # A concurrent retry answered first: give its answer (logged and billed by it), so
        # both callers agree and the log holds only ids someone was given.
        first = cache.get(remembered)
        if first is not None:
            return first
    # One transaction for the log and the ledger: one commit fewer, and a prediction that could
    # not be billed is not logged either (its caller gets an error, not its ids).
    with transaction.atomic():
        log()
        prediction_charge(
            deployment=deployment,
            version=version,
            count=len(inputs),
            inputs=inputs,
            actor=actor,
            idempotency_key=idempotency_key,
        )
    return answer
