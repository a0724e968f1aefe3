"""Reads of jobs and the pool, for pages, the API and (later) billing reports."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.db.models import (
    Case,
    Count,
    DateTimeField,
    F,
    Max,
    Min,
    OuterRef,
    Prefetch,
    Q,
    QuerySet,
    Subquery,
    Sum,
    When,
    Window,
)
from django.db.models.functions import RowNumber
from django.utils import timezone

from billing.selectors import (
    PRICE_AT,
    gpu_resource,
    gpu_resource_expression,
    minor_per_unit,
    price_at,
    price_at_subqueries,
    price_table,
    unit_price,
    usage_billed_through,
)
from tenants.compiled import CompiledRows, row_fields, row_instance
from tenants.models import Organization

from .models import (
    ACTIVE_STATES,
    Job,
    JobAttempt,
    JobState,
    ResourceClass,
    Runtime,
    UtilizationSample,
    Worker,
    WorkerRuntime,
    queued_ahead_of,
)
from .utilization import ClassPrice, Hint, rightsizing_hint


def job_list(
    *,
    organization: Organization,
    state: str | None = None,
    label: str | None = None,
    created_by: str | None = None,
) -> QuerySet[Job]:
    jobs = (
        Job.objects.for_organization(organization)
        .select_related(
            "resource_class",
            "created_by",
            "worker",
            "input_model_version__registered_model",
            "output_dataset_version__dataset",
            "input_dataset_version__dataset",
            "output_model_version__registered_model",
            "code_package_version__package",
        )
        # Jobs name their versions (name and number); a version's profile, preview, metrics
        # and parameters are kilobytes each, fetched 50 times a page for nothing.
        .defer(
            *(
                f"{relation}__{name}"
                for relation in ("input_dataset_version", "output_dataset_version")
                for name in ("schema", "profile", "preview")
            ),
            *(
                f"{relation}__{name}"
                for relation in ("input_model_version", "output_model_version")
                for name in ("parameters", "metrics", "input_signature")
            ),
            "code_package_version__manifest",
        )
    )
    if state:
        jobs = jobs.filter(state=state)
    if label:
        # Containment, not a key path: a user's label key must never become a lookup.
        key, sep, value = label.partition("=")
        if sep:
            jobs = jobs.filter(labels__contains={key: value})
        else:
            jobs = jobs.filter(labels__has_key=key)
    if created_by:
        jobs = jobs.filter(created_by__email__icontains=created_by)
    return jobs


# What job_costs_so_far reads of each job: a page's values() rows carry these keys.
COST_FIELDS = ("id", "state", "kind", "attempt", "gpu_count", "cost_minor", "resource_class__name")


# A read's row brings the started time of the job's current attempt (what job_costs_so_far
# prices a running job from) as a subquery of its own query, not a query of its own (a query
# was 0.5 to 1.5 ms of CPU per read, docs/benchmarks.md). A queued job's place stays a query of
# its own (queue_positions): as a subquery it counted the queue once per queued row of the page.
ATTEMPT_STARTED = "current_attempt_started_at"


def job_row_annotations() -> dict:
    """The values() expressions of ATTEMPT_STARTED and PRICE_AT (the price in force then) for a
    job row: null unless the job is active, the only state job_costs_so_far reads them in (so
    PostgreSQL runs the subqueries for those rows only, not for every row of a page)."""

    def started(job):  # the job's current attempt's start; `job` refers to the job's row
        return (
            JobAttempt.objects.filter(
                job=job("pk"), number=job("attempt"), started_at__isnull=False
            )
            .order_by()
            .values("started_at")[:1]
        )

    active = Q(state__in=ACTIVE_STATES)
    # The price in force when that attempt started, as job_costs_so_far prices it.
    price = price_at_subqueries(
        resource=gpu_resource_expression(OuterRef("resource_class__name")),
        at=Subquery(started(lambda name: OuterRef(OuterRef(name)))),
    )
    return {
        ATTEMPT_STARTED: Case(
            When(active, then=Subquery(started(OuterRef))), output_field=DateTimeField()
        ),
        **{key: Case(When(active, then=value)) for key, value in price.items()},
    }


def _queue_of_class(*, organization: int, resource_class: int):
    """The organization's queued jobs of one class with their 1-based place, in the order the
    scheduler takes them (priority, then submit time)."""
    return (
        Job.objects.for_organization(Organization(pk=organization))
        .filter(state=JobState.QUEUED, resource_class=resource_class)
        .annotate(
            position=Window(RowNumber(), order_by=[F("priority").desc(), F("created_at"), F("pk")])
        )
        .values("pk", "position")
    )


# Compiled once per process (tenants.compiled): building and compiling the window query was
# most of its cost on a list page (0.8 ms of CPU against well under 0.1 ms to run it).
_QUEUE_OF_CLASS = CompiledRows(_queue_of_class, prepared=True, organization=int, resource_class=int)


def queue_positions(*, organization: Organization, resource_class_ids: set[int]) -> dict[int, int]:
    """{job id: 1-based place} of the organization's queued jobs of these classes, in the order
    the scheduler takes them (priority, then submit time): a query per class (a page's queued
    jobs are mostly of one), not one per job."""
    return {
        row["pk"]: row["position"]
        for resource_class in sorted(resource_class_ids)
        for row in _QUEUE_OF_CLASS.rows(organization=organization.pk, resource_class=resource_class)
    }


def _queued_ahead(
    *, organization: int, resource_class: int, priority: int, created_at: datetime, job: int
):
    """How many of the organization's queued jobs of the class the scheduler takes before the
    job (Job.queue_position's count): one row, none for none."""
    return (
        Job.objects.for_organization(Organization(pk=organization))
        .filter(resource_class=resource_class, state=JobState.QUEUED)
        .filter(queued_ahead_of(priority=priority, created_at=created_at, pk=job))
        .order_by()
        .values("organization")
        .annotate(n=Count("pk"))
    )


_QUEUED_AHEAD = CompiledRows(
    _queued_ahead, organization=int, resource_class=int, priority=int, created_at=datetime, job=int
)


def job_queue_position(*, job: Job) -> int | None:
    """Job.queue_position, from a statement compiled once per process (a submit's response)."""
    if job.state != JobState.QUEUED:
        return None
    rows = _QUEUED_AHEAD.rows(
        organization=job.organization_id,
        resource_class=job.resource_class_id,
        priority=job.priority,
        created_at=job.created_at,
        job=job.pk,
    )
    return (rows[0]["n"] if rows else 0) + 1


def _resource_class_named(*, name: str):
    return ResourceClass.objects.filter(name=name).order_by().values(*row_fields(ResourceClass))


_RESOURCE_CLASS_NAMED = CompiledRows(_resource_class_named, name=str)


def resource_class_named(name: str) -> ResourceClass | None:
    """The resource class of that name (a job submit names one), or None."""
    rows = _RESOURCE_CLASS_NAMED.rows(name=name)
    return row_instance(ResourceClass, rows[0]) if rows else None


def queue_positions_attach(*, organization: Organization, jobs: Iterable[Job]) -> None:
    """Set `queued_ahead` on the organization's queued `jobs` (a page), read by
    `Job.queue_position`, not a count per job."""
    queued = [job for job in jobs if job.state == JobState.QUEUED]
    positions = queue_positions(
        organization=organization, resource_class_ids={job.resource_class_id for job in queued}
    )
    for job in queued:
        if job.pk in positions:
            job.queued_ahead = positions[job.pk] - 1


def slot_seconds_attach(*, organization: Organization, jobs: Iterable[Job], now=None) -> None:
    """Set `slot_seconds` on `jobs` (a page): the seconds each attempt ran times the slots the
    job holds, as usage is billed, a running attempt counted up to `now`. Pages show it beside
    the cost, so work priced at nothing (CPU) still says how much was done; one query."""
    jobs = list(jobs)
    now = now or timezone.now()
    seconds: Counter[int] = Counter()
    for job_id, started_at, ended_at, outcome in (
        JobAttempt.objects.for_organization(organization)
        .filter(job_id__in=[job.pk for job in jobs], started_at__isnull=False)
        .order_by()
        .values_list("job_id", "started_at", "ended_at", "outcome")
    ):
        # An attempt lost without an end was billed for nothing past its start.
        end = ended_at or (now if outcome == JobAttempt.Outcome.ACTIVE else started_at)
        seconds[job_id] += max(0.0, (end - started_at).total_seconds())
    for job in jobs:
        job.slot_seconds = seconds[job.pk] * job.gpu_count


def job_cost_so_far(*, job: Job, now=None) -> int:
    """Billed cents for finished attempts plus the running attempt's cost so far."""
    row = {
        "id": job.pk,
        "state": job.state,
        "kind": job.kind,
        "attempt": job.attempt,
        "gpu_count": job.gpu_count,
        "cost_minor": job.cost_minor,
        "resource_class__name": job.resource_class.name,
    }
    return job_costs_so_far(jobs=[row], now=now)[job.pk]


def job_costs_so_far(*, jobs: list[dict], now=None) -> dict[int, int]:
    """job_cost_so_far of each job (a dict with COST_FIELDS' keys: a page of the API's job list
    serializes from values() rows), in two queries whatever the number of running jobs, not two
    per running job; none where the rows bring ATTEMPT_STARTED and PRICE_AT
    (job_row_annotations)."""
    costs = {job["id"]: job["cost_minor"] for job in jobs}
    active = {job["id"]: job for job in jobs if job["state"] in ACTIVE_STATES}
    if not active:
        return costs
    if all(ATTEMPT_STARTED in job for job in active.values()):  # rows that bring it along
        started = {
            pk: job[ATTEMPT_STARTED]
            for pk, job in active.items()
            if job[ATTEMPT_STARTED] is not None
        }
    else:
        started = {
            attempt.job_id: attempt.started_at
            for attempt in JobAttempt.objects.filter(job_id__in=active, started_at__isnull=False)
            .only("job_id", "number", "started_at")
            .order_by()  # the model's order (job, number) would join the jobs table, for nothing
            if attempt.number == active[attempt.job_id]["attempt"]
        }
    # A replica's running attempt is billed as it runs: cost_minor holds those parts already.
    billed = usage_billed_through(
        source_type="job_attempt",
        attempts={
            str(pk): active[pk]["attempt"] for pk in started if active[pk]["kind"] == Job.Kind.SERVE
        },
    )
    brought = all(PRICE_AT[0] in active[pk] for pk in started)  # rows that bring it along
    prices = (
        {}
        if brought
        else price_table(
            resources={gpu_resource(active[pk]["resource_class__name"]) for pk in started}
        )
    )
    now = now or timezone.now()
    for pk, started_at in started.items():
        job = active[pk]
        since = max(started_at, billed.get(str(pk), started_at))
        seconds = Decimal(max(0.0, (now - since).total_seconds()))
        if brought and job[PRICE_AT[0]] is not None:
            price, currency = job[PRICE_AT[0]], job[PRICE_AT[1]]
        else:  # the table's, or with none (no price yet) price_at's default
            price, currency = price_at(
                prices, resource=gpu_resource(job["resource_class__name"]), at=started_at
            )
        costs[pk] += int(seconds * job["gpu_count"] * price * minor_per_unit(currency))
    return costs


def job_rightsizing_hint(
    *, utilization: dict | None, resource_class_name: str, gpu_count: int, now=None
) -> Hint | None:
    """The right-sizing hint for a job's newest sampled attempt (its `utilization` summary),
    priced from the rate card in force `now` for the span it was sampled
    (jobs.utilization.rightsizing_hint says what is assumed)."""
    if not utilization or not utilization.get("gpu_samples"):
        return None  # a CPU job, or no GPU readings: nothing to price, and no query
    classes = list(ResourceClass.objects.order_by("name"))
    now = now or timezone.now()
    prices = price_table(resources={gpu_resource(rc.name) for rc in classes})
    priced = [
        ClassPrice(
            rc.name, rc.gpu_memory_gb, *price_at(prices, resource=gpu_resource(rc.name), at=now)
        )
        for rc in classes
    ]
    current = next((c for c in priced if c.name == resource_class_name), None)
    if current is None:
        return None
    return rightsizing_hint(
        summary=utilization,
        current=current,
        classes=priced,
        gpu_count=gpu_count,
        run_seconds=utilization["seconds"],
        minor_per_unit=minor_per_unit(current.currency),
    )


def utilization_samples(*, organization: Organization, job: Job) -> QuerySet[UtilizationSample]:
    """The newest sampled attempt's samples, oldest first (at most UTILIZATION_MAX_SAMPLES rows
    by construction)."""
    samples = UtilizationSample.objects.for_organization(organization).filter(job=job)
    newest = samples.order_by("-attempt").values_list("attempt", flat=True).first()
    return samples.filter(attempt=newest or 0).order_by("at", "pk")


def utilization_series(*, organization: Organization, job: Job) -> list[tuple]:
    """utilization_samples as (at, cpu_cores, memory_bytes, gpu_utilization, gpu_memory_bytes)
    rows, for the charts."""
    return list(
        utilization_samples(organization=organization, job=job).values_list(
            "at", "cpu_cores", "memory_bytes", "gpu_utilization", "gpu_memory_bytes"
        )
    )


def resource_classes_with_prices() -> list[tuple[ResourceClass, Decimal, str]]:
    now = timezone.now()
    return [
        (rc, *unit_price(resource=gpu_resource(rc.name), at=now))
        for rc in ResourceClass.objects.order_by("name")
    ]


def pool_overview() -> dict:
    """Per class: machines, slots busy and free; per tenant: jobs queued and GPUs held."""
    classes: dict[str, dict] = defaultdict(
        lambda: {"workers": 0, "slots": 0, "busy": 0, "schedulable_free": 0}
    )
    busy_by_worker: Counter[int] = Counter()
    held: dict[tuple[str, str], int] = Counter()
    active = (
        Job.objects.filter(state__in=ACTIVE_STATES, worker__isnull=False)
        .select_related("organization", "resource_class")
        # Hundreds of rows on a busy pool: only the columns counted, not each job's JSON.
        .only("worker", "slot_indices", "gpu_count", "organization__name", "resource_class__name")
    )
    for job in active:
        busy_by_worker[job.worker_id] += len(job.slot_indices)
        held[(job.organization.name, job.resource_class.name)] += job.gpu_count
    workers = list(Worker.objects.select_related("resource_class"))
    for worker in workers:
        row = classes[worker.resource_class.name]
        row["workers"] += 1
        row["slots"] += worker.slots
        row["busy"] += busy_by_worker[worker.pk]
        if worker.status == Worker.Status.ONLINE:
            row["schedulable_free"] += worker.slots - busy_by_worker[worker.pk]
        worker.busy_slots = busy_by_worker[worker.pk]
    queued = Counter(
        Job.objects.filter(state=JobState.QUEUED).values_list(
            "organization__name", "resource_class__name"
        )
    )
    tenants = sorted(
        {key for key in queued} | {key for key in held},
    )
    return {
        "classes": dict(classes),
        "workers": workers,
        "tenants": [
            {
                "organization": o,
                "resource_class": c,
                "queued": queued[(o, c)],
                "held_gpus": held[(o, c)],
            }
            for o, c in tenants
        ],
    }


def runtimes_overview() -> list[Runtime]:
    """Every runtime workers have reported, each with its packages (`package_list`: name and
    version, by name) and its reports (`reports`: per worker, working or broken and why)."""
    runtimes = list(
        Runtime.objects.prefetch_related(
            Prefetch(
                "worker_reports",
                queryset=WorkerRuntime.objects.select_related("worker").order_by("worker__name"),
                to_attr="reports",
            )
        )
    )
    for runtime in runtimes:
        runtime.package_list = sorted(runtime.packages.items(), key=lambda p: p[0].lower())
        runtime.working = [r for r in runtime.reports if not r.error]
        runtime.broken = [r for r in runtime.reports if r.error]
    return runtimes


# Operators: the whole pool at once. Only the staff-only /ops/ page reads these.

MAX_UTILIZATION_BUCKETS = 24 * 31
NO_REASON = "(no reason yet)"


@dataclass(frozen=True)
class ClassUtilization:
    resource_class: str
    capacity_slots: int  # today's, see pool_utilization
    busy_gpu_seconds: list[float]  # per bucket
    fractions: list[float | None]  # per bucket; None: no capacity, or the bucket is all future

    @property
    def peak(self) -> float | None:
        return max((f for f in self.fractions if f is not None), default=None)

    @property
    def mean(self) -> float | None:
        known = [f for f in self.fractions if f is not None]
        return sum(known) / len(known) if known else None


@dataclass(frozen=True)
class PoolUtilization:
    start: datetime
    end: datetime
    bucket: timedelta
    buckets: list[datetime]  # the start of each bucket
    classes: list[ClassUtilization]


def pool_utilization(
    *, start: datetime, end: datetime, bucket: timedelta, now: datetime | None = None
) -> PoolUtilization:
    """Per resource class and time bucket, the fraction of its GPU slots busy with attempts.

    Busy time is each attempt's run (started_at to ended_at, or to `now` while it has no end)
    times its job's gpu_count, clipped to the bucket. Capacity is today's, not historical: the
    slots of the class's workers that are not offline now, since the pool keeps no history of
    its machines, so a class that lost workers since can show more than 100% in the past. Time
    after `now` does not count, so the current bucket is measured against the part that has
    passed. Two queries, however many attempts, jobs or workers.
    """
    now = now or timezone.now()
    if bucket <= timedelta(0) or end <= start:
        raise ValueError("pool_utilization needs start < end and a positive bucket.")
    count = -(-(end - start) // bucket)
    if count > MAX_UTILIZATION_BUCKETS:
        raise ValueError(f"At most {MAX_UTILIZATION_BUCKETS} buckets; widen the bucket.")
    buckets = [start + index * bucket for index in range(count)]
    horizon = min(end, now)

    capacity = dict(
        Worker.objects.exclude(status=Worker.Status.OFFLINE)
        .values("resource_class__name")
        .annotate(slots=Sum("slots"))
        .values_list("resource_class__name", "slots")
        .order_by()
    )
    busy: dict[str, list[float]] = defaultdict(lambda: [0.0] * count)
    attempts = (
        JobAttempt.objects.filter(started_at__isnull=False, started_at__lt=horizon)
        .filter(Q(ended_at__isnull=True) | Q(ended_at__gt=start))
        .values_list("job__resource_class__name", "job__gpu_count", "started_at", "ended_at")
        .order_by()
    )
    for name, gpus, began, ended in attempts:
        began, ended = max(began, start), min(ended or now, horizon)
        if ended <= began:
            continue
        index = (began - start) // bucket
        while index < count and buckets[index] < ended:
            overlap = min(ended, buckets[index] + bucket) - max(began, buckets[index])
            busy[name][index] += overlap.total_seconds() * gpus
            index += 1

    classes = []
    for name in sorted(set(capacity) | set(busy)):
        slots = capacity.get(name, 0)
        seconds = busy[name]
        fractions: list[float | None] = []
        for index, bucket_start in enumerate(buckets):
            elapsed = (min(bucket_start + bucket, horizon) - bucket_start).total_seconds()
            fractions.append(seconds[index] / (slots * elapsed) if slots and elapsed > 0 else None)
        classes.append(
            ClassUtilization(
                resource_class=name,
                capacity_slots=slots,
                busy_gpu_seconds=seconds,
                fractions=fractions,
            )
        )
    return PoolUtilization(start=start, end=end, bucket=bucket, buckets=buckets, classes=classes)


def workers_with_jobs() -> list[Worker]:
    """Every worker with its class, its jobs now (`current_jobs`, with their organization) and
    `busy_gpus`; two queries, however many workers and jobs."""
    current = (
        Job.objects.filter(state__in=ACTIVE_STATES)
        .select_related("organization")
        # A busy pool has hundreds of jobs here: only what the page shows, not their JSON.
        .only("worker", "state", "gpu_count", "started_at", "organization__name")
        .order_by(F("started_at").asc(nulls_last=True), "pk")
    )
    workers = list(
        Worker.objects.select_related("resource_class").prefetch_related(
            Prefetch("jobs", queryset=current, to_attr="current_jobs")
        )
    )
    for worker in workers:
        worker.busy_gpus = sum(job.gpu_count for job in worker.current_jobs)
    return workers


def queue_by_tenant() -> list[dict]:
    """Per organization with queued jobs: how many, the GPUs they ask for, since when the oldest
    waits, and why they wait (reason, count; commonest first). Busiest tenant first; one query."""
    cells = (
        Job.objects.filter(state=JobState.QUEUED)
        .values("organization_id", "organization__name", "organization__slug", "waiting_reason")
        .annotate(jobs=Count("id"), gpus=Sum("gpu_count"), oldest=Min("created_at"))
        .order_by()
    )
    tenants: dict[int, dict] = {}
    for cell in cells:
        tenant = tenants.setdefault(
            cell["organization_id"],
            {
                "organization_id": cell["organization_id"],
                "name": cell["organization__name"],
                "slug": cell["organization__slug"],
                "queued": 0,
                "gpus": 0,
                "oldest": cell["oldest"],
                "reasons": [],
            },
        )
        tenant["queued"] += cell["jobs"]
        tenant["gpus"] += cell["gpus"]
        tenant["oldest"] = min(tenant["oldest"], cell["oldest"])
        tenant["reasons"].append((cell["waiting_reason"] or NO_REASON, cell["jobs"]))
    for tenant in tenants.values():
        tenant["reasons"].sort(key=lambda reason: (-reason[1], reason[0]))
    return sorted(tenants.values(), key=lambda t: (-t["queued"], t["name"], t["organization_id"]))


@dataclass(frozen=True)
class FailingJobs:
    since: datetime
    jobs: list[Job]  # the latest failures, newest first, at most `limit`
    per_tenant: list[dict]  # organization_id, name, slug, failures, latest; most failures first

    @property
    def total(self) -> int:
        return sum(tenant["failures"] for tenant in self.per_tenant)


def failing_jobs(*, since: datetime, limit: int = 20) -> FailingJobs:
    """Jobs that failed since `since` (by finished_at), and the count per tenant; two queries."""
    failed = Job.objects.filter(state=JobState.FAILED, finished_at__gte=since)
    jobs = list(
        failed.select_related("organization", "resource_class", "worker").order_by(
            "-finished_at", "-pk"
        )[:limit]
    )
    per_tenant = list(
        failed.values("organization_id")
        .annotate(
            name=F("organization__name"),
            slug=F("organization__slug"),
            failures=Count("id"),
            latest=Max("finished_at"),
        )
        .order_by("-failures", "name", "organization_id")
    )
    return FailingJobs(since=since, jobs=jobs, per_tenant=per_tenant)


@dataclass(frozen=True)
class ReplicaEndpoint:
    address: str  # "host:port"
    attempt: int
    ready_at: datetime


def replica_endpoints(job_ids) -> dict[int, ReplicaEndpoint]:
    """Where the running serve jobs among `job_ids` answer, for those whose server is ready."""
    rows = Job.objects.filter(
        pk__in=list(job_ids), kind=Job.Kind.SERVE, state=JobState.RUNNING
    ).exclude(serve_address="")
    return {
        job_id: ReplicaEndpoint(address, attempt, ready_at)
        for job_id, address, attempt, ready_at in rows.values_list(
            "pk", "serve_address", "attempt", "serve_ready_at"
        )
    }


# Prometheus (factory_saas/ops/metrics.py): read at every scrape, so each is one grouped query.


def jobs_unfinished_counts() -> list[dict]:
    """Queued and active jobs counted per resource class, state and organization (slug), with
    the GPUs they hold or ask for: `resource_class`, `state`, `organization`, `jobs`, `gpus`."""
    rows = (
        Job.objects.filter(state__in=[JobState.QUEUED, *ACTIVE_STATES])
        .values("state", "resource_class__name", "organization__slug")
        .annotate(jobs=Count("id"), gpus=Sum("gpu_count"))
        .order_by()
    )
    return [
        {
            "resource_class": row["resource_class__name"],
            "state": row["state"],
            "organization": row["organization__slug"],
            "jobs": row["jobs"],
            "gpus": row["gpus"],
        }
        for row in rows
    ]


def pool_slot_counts() -> list[dict]:
    """Per resource class and worker status: `workers`, their `slots`, and `busy` slots (held
    by active jobs, a job's slots being its GPUs, as the scheduler counts them); two grouped
    queries."""
    busy = {
        (row["worker__resource_class__name"], row["worker__status"]): row["busy"]
        for row in Job.objects.filter(state__in=ACTIVE_STATES, worker__isnull=False)
        .values("worker__resource_class__name", "worker__status")
        .annotate(busy=Sum("gpu_count"))
        .order_by()
    }
    rows = (
        Worker.objects.values("resource_class__name", "status")
        .annotate(workers=Count("id"), slots=Sum("slots"))
        .order_by()
    )
    return [
        {
            "resource_class": row["resource_class__name"],
            "status": row["status"],
            "workers": row["workers"],
            "slots": row["slots"],
            "busy": busy.get((row["resource_class__name"], row["status"]), 0),
        }
        for row in rows
    ]
