"""The operators' pages (staff only): the overview at /ops/ (the pool, the queues, failures and
money at a glance, each with a way into the admin or a detailed page), the pool at /ops/pool/
and billing for all tenants at /ops/billing/."""

from __future__ import annotations

import math
from collections import Counter
from datetime import datetime, timedelta

from django.contrib.admin.views.decorators import staff_member_required
from django.shortcuts import render
from django.utils import timezone
from django.utils.decorators import method_decorator
from django.views import View

from billing.charts import BOTTOM, HEIGHT, LEFT, PALETTE, RIGHT, TOP, WIDTH
from billing.reports import ops_billing_overview
from jobs.selectors import (
    PoolUtilization,
    failing_jobs,
    pool_overview,
    pool_utilization,
    queue_by_tenant,
    workers_with_jobs,
)

UTILIZATION_WINDOW = timedelta(hours=24)
UTILIZATION_BUCKET = timedelta(hours=1)
FAILURE_WINDOW = timedelta(hours=24)
FAILING_JOBS_SHOWN = 20
WORKERS_SHOWN = 25
JOBS_PER_WORKER_SHOWN = 3
# Workers that need an operator first: silent, then leaving, then the busiest.
ATTENTION = {"offline": 0, "draining": 1, "cordoned": 2}
X_LABELS = 6


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else round(fraction * 100, 1)


def utilization_chart(utilization: PoolUtilization) -> dict:
    """Geometry of one line per resource class (share of slots busy per bucket), as inline SVG.

    The scale reaches 100%, or further when today's smaller capacity makes a past bucket exceed
    it; a bucket with no capacity or still in the future breaks the line instead of reading 0.
    """
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    buckets = utilization.buckets
    peak = max((c.peak for c in utilization.classes if c.peak is not None), default=0.0)
    # Up to a full pool in quarters; past it (capacity shrank since), in halves.
    ceiling = max(1.0, math.ceil(peak * 2) / 2)
    tick_step = 0.25 if ceiling <= 1.0 else 0.5
    slot = plot_w / max(len(buckets), 1)

    def x(index: int) -> float:
        return round(LEFT + index * slot + slot / 2, 2)

    def y(fraction: float) -> float:
        return round(TOP + plot_h * (1 - fraction / ceiling), 2)

    series = []
    for number, row in enumerate(utilization.classes):
        runs: list[list[str]] = [[]]
        points = []
        for index, fraction in enumerate(row.fractions):
            if fraction is None:
                if runs[-1]:
                    runs.append([])
                continue
            runs[-1].append(f"{x(index)},{y(fraction)}")
            points.append(
                {
                    "x": x(index),
                    "y": y(fraction),
                    "at": buckets[index],
                    "percent": _percent(fraction),
                }
            )
        series.append(
            {
                "resource_class": row.resource_class,
                "colour": PALETTE[number % len(PALETTE)],
                "capacity_slots": row.capacity_slots,
                "lines": [" ".join(run) for run in runs if run],
                "points": points,
                "mean_percent": _percent(row.mean),
                "peak_percent": _percent(row.peak),
            }
        )

    hourly = utilization.bucket < timedelta(days=1)
    every = max(1, -(-len(buckets) // X_LABELS))
    return {
        "width": WIDTH,
        "height": HEIGHT,
        "left": LEFT,
        "right": WIDTH - RIGHT,
        "baseline": TOP + plot_h,
        "label_y": HEIGHT - 6,
        "ticks": [
            {"percent": round(step * tick_step * 100), "y": y(step * tick_step)}
            for step in range(round(ceiling / tick_step) + 1)
        ],
        "x_labels": [
            {"x": x(index), "label": f"{at:%H:%M}" if hourly else f"{at:%b} {at.day}"}
            for index, at in enumerate(buckets)
            if index % every == 0
        ],
        "series": series,
        "rows": [
            {"at": at, "percents": [_percent(row.fractions[index]) for row in utilization.classes]}
            for index, at in enumerate(buckets)
        ],
    }


def _utilization_window(now: datetime) -> tuple[datetime, datetime]:
    """24 hourly buckets starting on the hour, the last one the current hour."""
    end = now.replace(minute=0, second=0, microsecond=0) + UTILIZATION_BUCKET
    return end - UTILIZATION_WINDOW, end


@method_decorator(staff_member_required, name="dispatch")
class OpsOverviewPage(View):
    """Operators: utilization, workers, queues, failures, spend and the Stripe outbox."""

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
        }
        return render(request, "ops/overview.html", context)


@method_decorator(staff_member_required, name="dispatch")
class PoolPage(View):
    """Operators: workers, busy and free slots per class, queue depth per tenant."""

    def get(self, request):
        return render(request, "ops/pool.html", pool_overview())


@method_decorator(staff_member_required, name="dispatch")
class OpsBillingPage(View):
    """Operators: revenue this month, top tenants, GPU-hours, stuck meter events, reconciliation."""

    def get(self, request):
        overview = ops_billing_overview(now=timezone.now())
        return render(request, "ops/billing.html", {"overview": overview})
