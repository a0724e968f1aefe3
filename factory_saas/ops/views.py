"""The operators' pages (staff only): the overview at /ops/ (the pool, the queues, failures and
money at a glance, each with a way into the admin or a detailed page), the pool at /ops/pool/,
the runtimes workers offer at /ops/runtimes/ and billing for all tenants at /ops/billing/."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.admin.views.decorators import staff_member_required
from django.shortcuts import render
from django.utils import timezone
from django.utils.decorators import method_decorator
from django.views import View

from billing.reports import ops_billing_overview
from jobs.selectors import (
    failing_jobs,
    pool_overview,
    pool_utilization,
    queue_by_tenant,
    runtimes_overview,
    workers_with_jobs,
)
from outbox.selectors import message_stuck_counts

from .charts import utilization_chart

UTILIZATION_WINDOW = timedelta(hours=24)
UTILIZATION_BUCKET = timedelta(hours=1)
FAILURE_WINDOW = timedelta(hours=24)
FAILING_JOBS_SHOWN = 20
WORKERS_SHOWN = 25
JOBS_PER_WORKER_SHOWN = 3
# A message is normally sent within seconds of its commit; one owed this long needs a look.
OUTBOX_OWED_TOO_LONG = timedelta(minutes=5)
# Workers that need an operator first: silent, then leaving, then the busiest.
ATTENTION = {"offline": 0, "draining": 1, "cordoned": 2}


def _utilization_window(now: datetime) -> tuple[datetime, datetime]:
    """24 hourly buckets starting on the hour, the last one the current hour."""
    end = now.replace(minute=0, second=0, microsecond=0) + UTILIZATION_BUCKET
    return end - UTILIZATION_WINDOW, end


@method_decorator(staff_member_required, name="dispatch")
class OpsOverviewPage(View):
    """Operators: utilization, workers, queues, failures, spend, the Stripe meter outbox and
    the side effects (outbox messages) given up or owed too long."""

    def get(self, request):
        now = timezone.now()
        start, end = _utilization_window(now)
        utilization = pool_utilization(start=start, end=end, bucket=UTILIZATION_BUCKET, now=now)
        queues = queue_by_tenant()
        workers = sorted(
            workers_with_jobs(),
            key=lambda w: (ATTENTION.get(w.status, len(ATTENTION)), -w.busy_gpus, w.name),
        )
        for shown in workers[:WORKERS_SHOWN]:
            shown.shown_jobs = shown.current_jobs[:JOBS_PER_WORKER_SHOWN]
        context = {
            "now": now,
            "utilization": utilization,
            "chart": utilization_chart(utilization),
            "workers": workers[:WORKERS_SHOWN],
            "worker_count": len(workers),
            "worker_states": sorted(Counter(w.get_status_display() for w in workers).items()),
            "queues": queues,
            "queued_total": sum(tenant["queued"] for tenant in queues),
            "failing": failing_jobs(since=now - FAILURE_WINDOW, limit=FAILING_JOBS_SHOWN),
            "billing": ops_billing_overview(now=now),
            "outbox": message_stuck_counts(older_than_s=OUTBOX_OWED_TOO_LONG.total_seconds()),
            "outbox_owed_minutes": int(OUTBOX_OWED_TOO_LONG.total_seconds() // 60),
        }
        return render(request, "ops/overview.html", context)


@method_decorator(staff_member_required, name="dispatch")
class PoolPage(View):
    """Operators: workers, busy and free slots per class, queue depth per tenant."""

    def get(self, request):
        return render(request, "ops/pool.html", pool_overview())


@method_decorator(staff_member_required, name="dispatch")
class RuntimesPage(View):
    """Operators: the runtimes workers reported, their packages, and which workers have them
    (working or broken, and why). Read only: workers' reports are the source."""

    def get(self, request):
        context = {"runtimes": runtimes_overview(), "default_runtime": settings.DEFAULT_RUNTIME}
        return render(request, "ops/runtimes.html", context)


@method_decorator(staff_member_required, name="dispatch")
class OpsBillingPage(View):
    """Operators: revenue this month, top tenants, GPU-hours, stuck meter events, reconciliation."""

    def get(self, request):
        overview = ops_billing_overview(now=timezone.now())
        return render(request, "ops/billing.html", {"overview": overview})
