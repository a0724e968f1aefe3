"""Liveness and readiness probes for load balancers and orchestrators.

Anyone can call them, so they say which check failed and nothing more; the error itself (hosts,
ports, driver messages) goes to the log.
"""

import logging

from django.db import connection
from django.http import JsonResponse
from django.views.decorators.cache import never_cache

from .celery import app as celery_app

logger = logging.getLogger(__name__)


@never_cache
def healthz(request):
    return JsonResponse({"status": "ok"})


def _check_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _check_broker() -> None:
    with celery_app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=2)


def _passes(name: str, check) -> bool:
    try:
        check()
    except Exception:  # any failure means not ready; the log says which and why
        logger.warning("readiness check %s failed", name, exc_info=True)
        return False
    return True


@never_cache
def readyz(request):
    checks = {"database": _passes("database", _check_database)}
    checks["broker"] = _passes("broker", _check_broker)
    ready = all(checks.values())
    body = {
        "status": "ok" if ready else "unavailable",
        "checks": {name: "ok" if passed else "unavailable" for name, passed in checks.items()},
    }
    return JsonResponse(body, status=200 if ready else 503)
