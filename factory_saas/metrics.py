"""Prometheus exposition for the web and the control plane, behind METRICS_TOKEN.

Each process records its own metrics with prometheus_client. Under gunicorn or Celery's prefork
pool a process's metrics are in that process only, so with PROMETHEUS_MULTIPROC_DIR set every
process writes them to files there and a scrape adds the files up (multiprocess mode); without
it (tests, `make run`) a scrape reads this process's registry. Imported by the gunicorn master
before Django is set up: nothing here touches the apps.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable
from pathlib import Path

from django.conf import settings
from django.http import HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
    multiprocess,
)
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> Path | None:
    value = os.environ.get(MULTIPROC_ENV, "")
    return Path(value) if value else None


def multiprocess_dir_reset() -> None:
    """Empty the metric files folder when a server starts: files left by the processes of an
    earlier run (a restarted container keeps its emptyDir) would be added to this run's."""
    folder = multiprocess_dir()
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink(missing_ok=True)


def process_dead(pid: int) -> None:
    """Drop a finished worker process's live gauges (gunicorn's child_exit hook)."""
    if multiprocess_dir() is not None:
        multiprocess.mark_process_dead(pid)


def token_refusal(authorization: str) -> tuple[int, str] | None:
    """Why a scrape with this Authorization header is refused (status, reason), or None.

    Never open by default: with no METRICS_TOKEN set every scrape is refused, whatever it sends
    (an empty token must not match an empty header)."""
    token = settings.METRICS_TOKEN
    if not token:
        return 403, "Metrics are off: set METRICS_TOKEN (docs/operations.md, Metrics)."
    scheme, _, offered = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        offered.strip().encode(), token.encode()
    ):
        return 401, "Send Authorization: Bearer <METRICS_TOKEN>."
    return None


def exposition(collectors: Iterable[Collector] = ()) -> bytes:
    """The text format of every process's metrics, plus `collectors` read now (each in a
    registry of its own for this scrape, so none joins the process's global one)."""
    folder = multiprocess_dir()
    if folder is None:
        recorded = REGISTRY
    else:
        recorded = CollectorRegistry()
        multiprocess.MultiProcessCollector(recorded, path=str(folder))
    now = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        now.register(collector)
    return generate_latest(recorded) + generate_latest(now)


@never_cache
@require_GET
def metrics_view(request):
    """The web's /metrics: request latency (django-prometheus), prediction latency, and the
    rest of what its processes record. The pool's gauges are the control plane's."""
    refusal = token_refusal(request.headers.get("Authorization", ""))
    if refusal is not None:
        status, reason = refusal
        response = HttpResponse(reason, status=status, content_type="text/plain")
        if status == 401:
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse(exposition(), content_type=CONTENT_TYPE_LATEST)
