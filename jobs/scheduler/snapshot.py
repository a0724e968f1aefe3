"""Load the pool's state from the database into a scheduler Snapshot."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection
from django.db.models import BigIntegerField, F, Func

from billing.selectors import (
    decayed_spend,
    gpu_resource,
    minor_per_unit,
    placement_blocks,
    plan_quotas,
    unit_price,
)
from jobs.models import (
    ACTIVE_STATES,
    Job,
    JobAttempt,
    JobState,
    Quota,
    ResourceClass,
    Worker,
    WorkerRuntime,
)
from tenants.models import Organization

from .types import Machine, Queued, Running, Snapshot, Tenant
from .types import Quota as QuotaSpec

STOPPING_PRIORITY = -(10**9)

# What a queued job stores of its last decision: reason, reserved machine, expected start.
StoredWaiting = tuple[str, int | None, datetime | None]


# A job without a maximum runtime (a serving replica, max_runtime_s 0) is expected to hold its
# slots this long: reservations and backfill never count on it ending.
UNBOUNDED_RUNTIME_S = 10 * 365 * 24 * 3600.0


def _expected_runtime(max_runtime_s: int) -> float:
    return float(max_runtime_s) if max_runtime_s else UNBOUNDED_RUNTIME_S


class _EpochMicroseconds(Func):
    template = "(EXTRACT(EPOCH FROM %(expressions)s) * 1000000)::bigint"
    output_field = BigIntegerField()
    # The driver returns an int already: no converter called on each of ten thousand rows.
    convert_value = staticmethod(Func._convert_value_noop)


def _epoch_column(field: str) -> Func | F:
    """`field` as whole microseconds since the epoch, worked out by PostgreSQL: decoding ten
    thousand timestamps in Python was most of a snapshot's load. Elsewhere (SQLite) the
    datetime itself."""
    return _EpochMicroseconds(field) if connection.vendor == "postgresql" else F(field)


def _epoch(moment: datetime | int) -> float:
    """Epoch seconds of a datetime or of `_epoch_column`'s microseconds: the same float."""
    if isinstance(moment, int):
        return moment / 1_000_000
    return moment.timestamp()


def snapshot_load(*, now: datetime) -> tuple[Snapshot, dict[int, StoredWaiting]]:
    """The snapshot, and what each queued job stores of its last decision, so that applying
    this pass's decisions skips the unchanged ones."""
    classes = {rc.pk: rc.name for rc in ResourceClass.objects.all()}
    prices = {
        name: float(unit_price(resource=gpu_resource(name), at=now)[0]) for name in classes.values()
    }

    placed = Job.objects.filter(state__in=ACTIVE_STATES, worker__isnull=False)
    active = list(
        placed.values(
            "pk", "organization_id", "resource_class_id", "gpu_count", "worker_id", "slot_indices",
            "priority", "scheduled_at", "max_runtime_s", "state",
        )
    )  # fmt: skip
    # The current attempt's start, not the job's first: a resumed job's clock restarts.
    attempt_started = dict(
        # A subquery, not a thousand job ids; no order (the default one joins each job).
        JobAttempt.objects.filter(job__in=placed.values("pk"), outcome=JobAttempt.Outcome.ACTIVE)
        .order_by()
        .values_list("job_id", "started_at")
    )
    busy: dict[int, set[int]] = defaultdict(set)
    running = []
    # Jobs already stopping are offered first as victims, so a pass never preempts more than one
    # set of jobs for the same need while the first set is still checkpointing.
    stopping = {JobState.PREEMPTED, JobState.CANCELLING}
    for job in active:
        busy[job["worker_id"]].update(job["slot_indices"])
        start = _epoch(attempt_started.get(job["pk"]) or job["scheduled_at"] or now)
        running.append(
            Running(
                job_id=job["pk"],
                tenant_id=job["organization_id"],
                resource_class=classes[job["resource_class_id"]],
                gpus=job["gpu_count"],
                machine_id=job["worker_id"],
                priority=STOPPING_PRIORITY if job["state"] in stopping else job["priority"],
                started_at=start,
                expected_end=start + _expected_runtime(job["max_runtime_s"]),
            )
        )
    # Only the runtimes a worker reported working: a broken one places nothing there.
    runtimes: dict[int, set[str]] = defaultdict(set)
    for worker_id, name in WorkerRuntime.objects.filter(error="").values_list(
        "worker_id", "runtime__name"
    ):
        runtimes[worker_id].add(name)
    machines = tuple(
        Machine(
            id=pk,
            resource_class=classes[class_id],
            slots=slots,
            free=frozenset(range(slots)) - frozenset(busy[pk]),
            schedulable=status == Worker.Status.ONLINE,
            runtimes=frozenset(runtimes[pk]),
        )
        for pk, class_id, slots, status in Worker.objects.values_list(
            "pk", "resource_class_id", "slots", "status"
        )
    )
    queued_rows = list(
        Job.objects.filter(state=JobState.QUEUED)
        .annotate(submitted_us=_epoch_column("created_at"))
        .values_list(
            "pk", "organization_id", "resource_class_id", "gpu_count", "priority", "submitted_us",
            "max_runtime_s", "runtime", "waiting_reason", "reserved_machine", "expected_start_at",
        )
    )  # fmt: skip
    queued = tuple(
        Queued(
            job_id=pk,
            tenant_id=tenant,
            resource_class=classes[class_id],
            gpus=gpus,
            priority=priority,
            submitted_at=_epoch(submitted),
            max_runtime_s=_expected_runtime(runtime_s),
            runtime=runtime,
        )
        for pk, tenant, class_id, gpus, priority, submitted, runtime_s, runtime, *_ in queued_rows
    )
    tenant_ids = {job.tenant_id for job in queued} | {job.tenant_id for job in running}
    snapshot = Snapshot(
        now=_epoch(now),
        machines=machines,
        running=tuple(running),
        queued=queued,
        tenants=_tenants(
            tenant_ids, classes, prices, running, {k for k, v in attempt_started.items() if v}, now
        ),
        prices=prices,
    )
    return snapshot, {row[0]: tuple(row[8:]) for row in queued_rows}


def _tenants(tenant_ids, classes, prices, running, started, now) -> dict[int, Tenant]:
    organizations = Organization.objects.in_bulk(tenant_ids)
    quotas: dict[int, dict[str, QuotaSpec]] = defaultdict(dict)
    max_running: dict[int, int] = {}
    for quota in Quota.objects.filter(organization_id__in=tenant_ids):
        quotas[quota.organization_id][classes[quota.resource_class_id]] = QuotaSpec(
            guaranteed=quota.guaranteed_gpus, limit=quota.limit_gpus
        )
        # One cap per tenant: the largest any of its per-class quotas allows.
        max_running[quota.organization_id] = max(
            max_running.get(quota.organization_id, 0), quota.max_running_jobs
        )
    default = settings.DEFAULT_QUOTA
    spend = decayed_spend(
        organization_ids=list(tenant_ids),
        now=now,
        half_life=timedelta(seconds=settings.SCHEDULER_HALF_LIFE_S),
    )
    # The ledger is in minor units; the scheduler compares money in currency units, like its
    # prices.
    minor = minor_per_unit(settings.BILLING_CURRENCY)
    usage = {tenant_id: cents / minor for tenant_id, cents in spend.items()}
    # Running attempts are not in the ledger yet; their cost so far counts too.
    running_cost: dict[int, float] = defaultdict(float)
    for job in running:
        seconds = max(0.0, now.timestamp() - job.started_at) if job.job_id in started else 0.0
        running_cost[job.tenant_id] += seconds * job.gpus * prices[job.resource_class]
    for tenant_id, cost in running_cost.items():
        usage[tenant_id] = usage.get(tenant_id, 0.0) + cost
    blocks = placement_blocks(
        organizations=list(organizations.values()),
        now=now,
        running_minor={tenant_id: int(cost * minor) for tenant_id, cost in running_cost.items()},
    )
    plans = plan_quotas(organization_ids=list(tenant_ids))
    tenants = {}
    for tenant_id in tenant_ids:
        plan = plans.get(tenant_id)
        if plan is None:
            fallback = QuotaSpec(guaranteed=default["guaranteed_gpus"], limit=default["limit_gpus"])
            job_cap = default["max_running_jobs"]
        else:
            fallback = QuotaSpec(guaranteed=plan.guaranteed_gpus, limit=plan.limit_gpus)
            job_cap = plan.max_running_jobs
        organization = organizations[tenant_id]
        tenants[tenant_id] = Tenant(
            id=tenant_id,
            quotas={name: quotas[tenant_id].get(name, fallback) for name in classes.values()},
            max_running_jobs=max_running.get(tenant_id, job_cap),
            usage=usage.get(tenant_id, 0.0),
            budget_ok=tenant_id not in blocks,
            block_reason=blocks.get(tenant_id, ""),
            label=organization.name,
        )
    return tenants
