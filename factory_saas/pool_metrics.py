"""The control plane's /metrics, served by its Celery worker where METRICS_PORT is set: the
pool, the queues and the outboxes read from PostgreSQL at each scrape, beside what its worker
processes recorded (the scheduler tick's metrics).

Read at scrape time rather than set by the tick: the figures are true even when the tick is
stuck or dead (exactly when a growing queue must show), they need no multiprocess gauge rules,
and the outboxes are not the tick's business. It costs six grouped queries per scrape, on the
control plane only, so adding web replicas does not multiply them.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from wsgiref.simple_server import WSGIRequestHandler, make_server

from django.conf import settings
from django.db import DatabaseError, connections
from django.utils import timezone
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from billing.selectors import meter_push_pending
from factory_saas.metrics import exposition, token_refusal
from jobs.models import ACTIVE_STATES, JobState, Worker
from jobs.selectors import jobs_unfinished_counts, pool_slot_counts
from outbox.models import Message
from outbox.selectors import message_unsent_by_handler
from webhooks.selectors import delivery_pending_summary

logger = logging.getLogger(__name__)

# Organizations past the METRICS_TOP_TENANTS with the most queued jobs are summed under this
# label; parentheses keep it apart from any organization's slug.
OTHER_TENANTS = "(other)"


class PoolCollector(Collector):
    """Gauges of the pool, queues and outboxes, read from the database when scraped."""

    def collect(self):
        up = GaugeMetricFamily(
            "factory_pool_read_up", "1 when this scrape could read the pool from PostgreSQL."
        )
        try:
            families = self._families()
        except DatabaseError:
            logger.warning("metrics: could not read the pool", exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> list[GaugeMetricFamily]:
        jobs = jobs_unfinished_counts()
        slots = pool_slot_counts()
        outbox = message_unsent_by_handler()
        meter = meter_push_pending()
        webhooks = delivery_pending_summary()
        now = timezone.now()
        classes = sorted({row["resource_class"] for row in jobs + slots})
        return [
            *self._queues(jobs, classes),
            *self._pool(jobs, slots, classes),
            *self._outboxes(outbox, meter, now),
            *self._webhooks(webhooks, now),
        ]

    def _queues(self, jobs: list[dict], classes: list[str]) -> list[GaugeMetricFamily]:
        queued = [row for row in jobs if row["state"] == JobState.QUEUED]
        depth = GaugeMetricFamily(
            "factory_queue_jobs", "Queued jobs per resource class.", labels=["resource_class"]
        )
        gpus = GaugeMetricFamily(
            "factory_queue_gpus",
            "GPUs (slots) the queued jobs of a resource class ask for.",
            labels=["resource_class"],
        )
        by_class, gpus_by_class, by_tenant = Counter(), Counter(), Counter()
        for row in queued:
            by_class[row["resource_class"]] += row["jobs"]
            gpus_by_class[row["resource_class"]] += row["gpus"]
            by_tenant[row["organization"]] += row["jobs"]
        for name in classes:
            depth.add_metric([name], by_class[name])
            gpus.add_metric([name], gpus_by_class[name])
        tenants = GaugeMetricFamily(
            "factory_queue_tenant_jobs",
            f"Queued jobs of the METRICS_TOP_TENANTS organizations with the most; the rest "
            f"summed as {OTHER_TENANTS}.",
            labels=["organization"],
        )
        top = by_tenant.most_common(settings.METRICS_TOP_TENANTS)
        for slug, count in top:
            tenants.add_metric([slug], count)
        tenants.add_metric([OTHER_TENANTS], sum(by_tenant.values()) - sum(c for _s, c in top))
        return [depth, gpus, tenants]

    def _pool(
        self, jobs: list[dict], slots: list[dict], classes: list[str]
    ) -> list[GaugeMetricFamily]:
        active = GaugeMetricFamily(
            "factory_jobs",
            "Jobs placed and not finished, per resource class and state (running: started).",
            labels=["resource_class", "state"],
        )
        counts = Counter()
        for row in jobs:
            if row["state"] in ACTIVE_STATES:
                counts[(row["resource_class"], row["state"])] += row["jobs"]
        for name in classes:
            for state in ACTIVE_STATES:
                active.add_metric([name, state], counts[(name, state)])
        workers = GaugeMetricFamily(
            "factory_pool_workers",
            "Workers per resource class and status.",
            labels=["resource_class", "status"],
        )
        total = GaugeMetricFamily(
            "factory_pool_slots",
            "GPU slots (CPU slots for the cpu class) per resource class and worker status.",
            labels=["resource_class", "status"],
        )
        free = GaugeMetricFamily(
            "factory_pool_free_slots",
            "Slots the scheduler may place on now: online workers' slots no active job holds.",
            labels=["resource_class"],
        )
        free_by_class = Counter()
        for row in slots:
            workers.add_metric([row["resource_class"], row["status"]], row["workers"])
            total.add_metric([row["resource_class"], row["status"]], row["slots"])
            if row["status"] == Worker.Status.ONLINE:
                free_by_class[row["resource_class"]] += max(row["slots"] - row["busy"], 0)
        for name in classes:
            free.add_metric([name], free_by_class[name])
        return [active, workers, total, free]

    def _outboxes(self, outbox: list[dict], meter: dict, now) -> list[GaugeMetricFamily]:
        messages = GaugeMetricFamily(
            "factory_outbox_messages",
            "Side effects owed after a commit (outbox app), per handler: pending or dead "
            "(given up).",
            labels=["handler", "state"],
        )
        lag = GaugeMetricFamily(
            "factory_outbox_lag_seconds",
            "Age of the oldest pending outbox message per handler (since it was owed).",
            labels=["handler"],
        )
        for row in outbox:
            messages.add_metric([row["handler"], row["state"]], row["messages"])
            if row["state"] == Message.State.PENDING:
                lag.add_metric([row["handler"]], (now - row["oldest"]).total_seconds())
        pending = GaugeMetricFamily(
            "factory_meter_events_pending", "Ledger rows not yet sent to Stripe as meter events."
        )
        pending.add_metric([], meter["pending"])
        meter_lag = GaugeMetricFamily(
            "factory_meter_events_lag_seconds",
            "Age of the oldest ledger row not yet sent to Stripe (0 with none).",
        )
        oldest = meter["oldest"]
        meter_lag.add_metric([], (now - oldest).total_seconds() if oldest else 0.0)
        return [messages, lag, pending, meter_lag]

    def _webhooks(self, webhooks: dict, now) -> list[GaugeMetricFamily]:
        pending = GaugeMetricFamily(
            "factory_webhook_deliveries_pending",
            "Tenant webhook deliveries owed to enabled endpoints (tried with backoff for 3 days).",
        )
        pending.add_metric([], webhooks["pending"])
        lag = GaugeMetricFamily(
            "factory_webhook_outbox_lag_seconds",
            "Age of the longest-owed webhook delivery to an enabled endpoint (0 with none).",
        )
        oldest = webhooks["oldest"]
        lag.add_metric([], (now - oldest).total_seconds() if oldest else 0.0)
        return [pending, lag]


def _scrape(environ, start_response):
    """The control plane's metrics server: /metrics behind METRICS_TOKEN, and an open /healthz
    that answers while the worker's main process lives (the liveness probe)."""
    path = environ.get("PATH_INFO", "")
    if path == "/healthz":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]
    if path != "/metrics":
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]
    refusal = token_refusal(environ.get("HTTP_AUTHORIZATION", ""))
    if refusal is not None:
        status, reason = refusal
        headers = [("Content-Type", "text/plain")]
        if status == 401:
            headers.append(("WWW-Authenticate", 'Bearer realm="metrics"'))
        start_response(f"{status} {'Unauthorized' if status == 401 else 'Forbidden'}", headers)
        return [reason.encode()]
    try:
        body = exposition([PoolCollector()])
    finally:
        # This thread's connection, closed between scrapes: the worker's pool processes fork
        # from this process and must not inherit an open one.
        connections.close_all()
    start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
    return [body]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # Prometheus scrapes every few seconds: no log line
        pass


def control_plane_metrics_serve(*, port: int, host: str = "0.0.0.0") -> ThreadingWSGIServer:  # noqa: S104
    """Serve /metrics and /healthz on `port` from a daemon thread of this process."""
    server = make_server(host, port, _scrape, ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    if not settings.METRICS_TOKEN:
        logger.warning("metrics: METRICS_TOKEN is not set; /metrics refuses every scrape")
    logger.info("metrics: serving /metrics on port %s", server.server_port)
    return server
