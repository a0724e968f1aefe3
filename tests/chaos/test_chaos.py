"""Chaos: 50 small training jobs from three tenants on two real pool workers, while at seeded
random moments a worker is SIGKILLed (and started again), Redis restarts and the S3 server is
down for 10 s. Afterwards every job has ended, at least MIN_SUCCEEDED of them succeeded and each
failure says why, no job had two attempts at once, each started attempt is billed once, Stripe
received what the ledger holds, and storage holds no object that the database does not reference.

Everything is real but Stripe (the fake server over HTTP): PostgreSQL, a Redis and a SeaweedFS of
the test's own (so that restarting them disturbs nobody else), beat, the default-queue worker and
`run_worker` processes with torch children. `CHAOS_SEED=<n>` replays another fault plan.

Faults leave objects behind (a delete that failed while storage was down, a checkpoint stored
by a worker killed before it recorded it); the product's orphan sweep must collect every one.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import time
from collections import Counter, defaultdict
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db.models import Sum
from django.test import override_settings
from django.utils import timezone

from billing.metering import meter_push_due
from billing.models import BillingAccount, MeterPush, UsageRecord
from jobs.models import TERMINAL_STATES, Job, JobAttempt, JobState, ResourceClass
from jobs.samples.tabular import write_tabular_sample
from jobs.services import JobOptions, training_job_submit
from jobs.services.storage_sweep import storage_orphans_sweep
from registry.models import DatasetVersion, ModelArtifact, PendingUpload
from registry.services import dataset_create, dataset_version_create
from tenants.actors import Actor
from tests.billing.stripe_server import StripeServer
from tests.chaos.redis_server import RedisServer, celery_broker
from tests.factories import MembershipFactory, OrganizationFactory, PriceFactory
from tests.pool import Pool
from tests.processes import wait_for
from tests.s3server import running_s3_server

JOBS = 50
TENANTS = 3
ROWS = 300
DEFAULT_SEED = 20261126
KILLS = 3
REDIS_RESTARTS = 2
S3_OUTAGE_S = 10.0
# Seconds after the first attempt starts, while the queue is still long: kills and Redis
# restarts first, then the storage outage, which fails every job placed during it (see
# _fault_plan) and so would leave the other faults little to hit.
KILL_AND_REDIS_WINDOW_S = (3.0, 35.0)
S3_WINDOW_S = (35.0, 50.0)
JOBS_DEADLINE_S = 300
# Faults may fail a few jobs, each with its reason (a job lost JOB_MAX_LOST_ATTEMPTS times);
# more failures mean recovery broke, even if every one of them says why. The last recorded run
# had 46 of 50 succeed, before storing outputs waited out the storage outage.
MIN_SUCCEEDED = 45
WORKERS = ("w1", "w2")

TIMINGS = {
    "WORKER_HEARTBEAT_S": "0.5",
    "WORKER_OFFLINE_AFTER_S": "6",
    "JOB_CHECKPOINT_EVERY_S": "0.2",
    "JOB_STOP_GRACE_S": "3",
    "SCHEDULER_TICK_S": "0.5",
    "WORKER_CPU_SLOTS": "2",
}
PARAMETERS = {
    "target": "label",
    "epochs": 2,
    "batch_size": 8,
    "hidden_sizes": [16],
    "early_stopping_patience": 0,
}

chaos = pytest.mark.django_db(transaction=True)
# Its deadlines assume the machine to itself: make test runs it after the parallel part.
pytestmark = pytest.mark.serial


@pytest.fixture
def services(tmp_path):
    """Redis, S3 and Stripe for the pool and this process, each the test's own."""
    (tmp_path / "redis").mkdir()
    (tmp_path / "s3").mkdir()
    broker = RedisServer(tmp_path / "redis")
    broker.start()
    stripe_server = StripeServer().start()
    try:
        with running_s3_server(tmp_path / "s3") as s3:
            config = {
                "STORAGE_BACKEND": "s3",
                "S3_ENDPOINT_URL": s3.endpoint_url,
                "S3_BUCKET": s3.bucket,
                "S3_REGION": s3.region,
                "S3_ACCESS_KEY_ID": s3.access_key,
                "S3_SECRET_ACCESS_KEY": s3.secret_key,
                "STRIPE_SECRET_KEY": stripe_server.fake.api_key,
                "STRIPE_WEBHOOK_SECRET": stripe_server.fake.webhook_secret,
                "STRIPE_API_BASE": stripe_server.url,
                "STRIPE_TIMEOUT_S": 2.0,
                "STRIPE_PUSH_BACKOFF_S": 0.01,
                "STRIPE_PUSH_BACKOFF_MAX_S": 0.1,
            }
            # The app reads its configuration from the settings on first use: switch it before
            # the settings change, so that it keeps the real broker to go back to.
            with (
                celery_broker(broker.url),
                override_settings(REDIS_URL=broker.url, CELERY_BROKER_URL=broker.url, **config),
            ):
                yield broker, s3, stripe_server.fake, {k: str(v) for k, v in config.items()}
    finally:
        stripe_server.stop()
        broker.stop()


@pytest.fixture
def chaos_pool(tmp_path, services):
    _broker, _s3, _fake, config = services
    pool = Pool(tmp_path)  # takes REDIS_URL and the broker from the settings overridden above
    pool.env.update({**TIMINGS, **config})
    try:
        pool.start_control_plane()
        for label in WORKERS:
            pool.start_worker(label)
        yield pool
    finally:
        pool.stop()


def _tenants(tmp_path) -> list[tuple]:
    """Three organizations, each with an owner and its own small CSV as a dataset version."""
    # A cent per CPU-second, so that every attempt's ledger row has an amount to send to Stripe.
    PriceFactory(
        resource="gpu:cpu",
        unit_price=Decimal("0.01"),
        effective_from=timezone.now() - timedelta(hours=1),
    )
    tenants = []
    for n in range(TENANTS):
        organization = OrganizationFactory()
        owner = MembershipFactory(organization=organization, role="owner").user
        path = tmp_path / f"churn-{n}.csv"
        write_tabular_sample(path, rows=ROWS, seed=n)
        dataset = dataset_create(organization=organization, name="churn", actor=Actor(user=owner))
        version = dataset_version_create(
            dataset=dataset, path=path, filename="churn.csv", actor=Actor(user=owner)
        )
        tenants.append((organization, owner, version))
    return tenants


def _fault_plan(rng: random.Random) -> list[tuple[float, str, str]]:
    """(seconds after the first start, fault, worker) in order.

    The outage comes last because a job whose input download fails while storage is down fails
    for good ("Could not prepare inputs"), so every job placed during those 10 s fails at once.
    """
    low, high = KILL_AND_REDIS_WINDOW_S
    plan = [(rng.uniform(low, high), "kill", rng.choice(WORKERS)) for _ in range(KILLS)]
    plan += [(rng.uniform(low, high), "redis", "") for _ in range(REDIS_RESTARTS)]
    plan.append((rng.uniform(*S3_WINDOW_S), "s3", ""))
    return sorted(plan)


def _unfinished(job_ids: list[int]) -> int:
    return Job.objects.filter(pk__in=job_ids).exclude(state__in=TERMINAL_STATES).count()


def _stuck_report(job_ids: list[int], pool: Pool) -> str:
    lines = []
    for job in Job.objects.filter(pk__in=job_ids).exclude(state__in=TERMINAL_STATES):
        lines.append(f"job {job.pk}: {job.state}, attempt {job.attempt}, {job.waiting_reason!r}")
        for attempt in job.attempts.order_by("number"):
            lines.append(
                f"  attempt {attempt.number} on {attempt.worker}: {attempt.outcome} "
                f"{attempt.started_at}..{attempt.ended_at}"
            )
        for event in job.events.order_by("created_at", "pk"):
            lines.append(f"  {event.created_at:%H:%M:%S.%f} {event.kind}: {event.message[:200]}")
    return "\n".join(lines) + "\n" + pool.logs()


def _drain_meter_outbox() -> int:
    """Send every pending meter event. The pool has stopped, so a lease its pusher took on rows
    it never finished is void: those rows are claimed as if their lease had run out."""
    sent = 0
    deadline = time.monotonic() + 60
    while MeterPush.objects.filter(state=MeterPush.State.PENDING).exists():
        assert time.monotonic() < deadline, list(
            MeterPush.objects.filter(state=MeterPush.State.PENDING).values("usage_id", "last_error")
        )
        sent += meter_push_due(now=timezone.now() + timedelta(hours=1)).sent
    return sent


def _bucket_keys(s3) -> set[str]:
    client = s3.client()
    keys: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket):
        keys.update(item["Key"] for item in page.get("Contents", []))
    return keys


def _prefix(key: str) -> str:
    """orgs/<id>/<kind>/ of a key."""
    return "/".join(key.split("/")[:3]) + "/"


@chaos
def test_jobs_end_billed_once_without_orphans_through_kills_and_outages(
    chaos_pool, services, tmp_path
):
    pool = chaos_pool
    broker, s3, fake, _config = services
    seed = int(os.environ.get("CHAOS_SEED", DEFAULT_SEED))
    rng = random.Random(seed)  # noqa: S311  a fault plan, not security
    plan = _fault_plan(rng)
    print(
        f"\nchaos seed {seed}; plan: "
        + ", ".join(f"{at:.1f}s {kind} {target}".strip() for at, kind, target in plan)
    )
    began = time.monotonic()

    tenants = _tenants(tmp_path)
    options = JobOptions(resource_class=ResourceClass.objects.get(name="cpu"), max_runtime_s=600)
    job_ids = []
    for n in range(JOBS):
        organization, owner, version = tenants[n % TENANTS]
        job, _ = training_job_submit(
            organization=organization,
            actor=Actor(user=owner),
            recipe="tabular-classifier",
            parameters=PARAMETERS,
            dataset_version=version,
            options=options,
        )
        job_ids.append(job.pk)

    wait_for(
        lambda: JobAttempt.objects.filter(job_id__in=job_ids, started_at__isnull=False).exists(),
        timeout=60,
        what="the first attempt to start",
    )
    first_start = time.monotonic()
    faults: Counter[str] = Counter()
    try:
        for at, kind, target in plan:
            wait_for(
                lambda at=at: not _unfinished(job_ids) or time.monotonic() - first_start >= at,
                timeout=JOBS_DEADLINE_S,
                what=f"the moment of fault {kind} at {at:.1f} s",
                every=0.2,
            )
            if not _unfinished(job_ids):
                break
            if kind == "kill":
                pool.kill(target)
                pool.start_worker(target)
            elif kind == "redis":
                broker.restart()
            else:
                s3.outage(S3_OUTAGE_S)
            faults[kind] += 1
            print(f"  {time.monotonic() - first_start:6.1f}s {kind} {target}".rstrip())
        wait_for(
            lambda: not _unfinished(job_ids),
            timeout=JOBS_DEADLINE_S - (time.monotonic() - first_start),
            what="every job to end",
            every=0.5,
        )
    except AssertionError:
        print(_stuck_report(job_ids, pool))
        raise
    jobs_done_s = time.monotonic() - began
    pool.stop()  # nothing runs or pushes meter events from here on
    meter_sent_at_end = _drain_meter_outbox()

    jobs = list(Job.objects.filter(pk__in=job_ids).order_by("pk"))
    states = Counter(job.state for job in jobs)
    attempts = list(JobAttempt.objects.filter(job_id__in=job_ids).order_by("job_id", "number"))
    started = [a for a in attempts if a.started_at is not None]
    outcomes = Counter(a.outcome for a in attempts)
    organizations = [organization for organization, _owner, _version in tenants]
    problems: list[str] = []
    if faults != {"kill": KILLS, "redis": REDIS_RESTARTS, "s3": 1}:
        problems.append(
            f"the jobs ended before every fault was injected: {dict(faults)}; move the windows"
        )

    # (a) none stuck, most succeeded, (b) every failure says why, every success has its model.
    if set(states) - {JobState.SUCCEEDED, JobState.FAILED}:
        problems.append(f"jobs not succeeded or failed: {dict(states)}")
    if states[JobState.SUCCEEDED] < MIN_SUCCEEDED:
        problems.append(
            f"{states[JobState.SUCCEEDED]} of {JOBS} jobs succeeded, fewer than {MIN_SUCCEEDED}"
        )
    failures = Counter(
        (job.failure_reason.strip().splitlines() or [""])[0][:120]
        for job in jobs
        if job.state == JobState.FAILED
    )
    if "" in failures:
        problems.append(f"{failures['']} failed jobs without a reason")
    without_model = [
        job.pk
        for job in jobs
        if job.state == JobState.SUCCEEDED and job.output_model_version_id is None
    ]
    if without_model:
        problems.append(f"succeeded without a model version: {without_model}")

    # (c) attempts are numbered once, all closed, and never overlap.
    by_job: dict[int, list[JobAttempt]] = defaultdict(list)
    for attempt in attempts:
        by_job[attempt.job_id].append(attempt)
    for job_id, rows in by_job.items():
        numbers = [a.number for a in rows]
        if len(numbers) != len(set(numbers)):
            problems.append(f"job {job_id} attempt numbers repeat: {numbers}")
        if any(
            a.outcome == JobAttempt.Outcome.ACTIVE or (a.started_at and not a.ended_at)
            for a in rows
        ):
            problems.append(f"job {job_id} has an open attempt: {rows}")
            continue
        ran = sorted((a for a in rows if a.started_at), key=lambda a: a.started_at)
        problems += [
            f"job {job_id}: attempt {a.number} (to {a.ended_at}) overlaps attempt {b.number} "
            f"(from {b.started_at})"
            for a, b in itertools.pairwise(ran)
            if a.ended_at > b.started_at
        ]

    # (d) one ledger row per started attempt, none for the others.
    billed = Counter(
        UsageRecord.objects.filter(
            source_type="job_attempt", source_id__in=map(str, job_ids)
        ).values_list("idempotency_key", flat=True)
    )
    expected = {f"job:{a.job_id}:attempt:{a.number}" for a in started}
    if any(count != 1 for count in billed.values()):
        problems.append(f"attempts billed twice: {[k for k, c in billed.items() if c != 1]}")
    if set(billed) - expected:
        problems.append(f"billed without starting: {sorted(set(billed) - expected)}")
    if expected - set(billed):
        problems.append(f"started, not billed: {sorted(expected - set(billed))}")

    # (e) what Stripe received equals the ledger, per tenant.
    unsent = MeterPush.objects.exclude(state__in=[MeterPush.State.SENT, MeterPush.State.SKIPPED])
    if unsent.exists():
        problems.append(f"meter events not sent: {list(unsent.values('usage_id', 'last_error'))}")
    ledger_total = meter_total = 0
    for organization in organizations:
        ledger = (
            UsageRecord.objects.filter(organization=organization).aggregate(
                total=Sum("amount_minor")
            )["total"]
            or 0
        )
        customer = (
            BillingAccount.objects.filter(organization=organization)
            .values_list("stripe_customer_id", flat=True)
            .first()
        )
        metered = fake.meter_total(customer=customer) if customer else 0
        if ledger != metered:
            problems.append(f"{organization.slug}: ledger {ledger} != meter events {metered}")
        ledger_total += ledger
        meter_total += metered
    if meter_total != fake.meter_total():
        problems.append(f"meter events for unknown customers: {fake.meter_total() - meter_total}")
    ledger_rows = UsageRecord.objects.filter(organization__in=organizations)
    charged_rows = ledger_rows.filter(amount_minor__gt=0).count()
    if len(fake.meter_events) != charged_rows:
        problems.append(f"{len(fake.meter_events)} meter events for {charged_rows} charged rows")

    # (f) storage holds what the database references, and nothing else, once the orphan sweep
    # (jobs.storage_sweep, hourly in production, for objects older than STORAGE_ORPHAN_AGE_S)
    # has collected what the faults left: deletes that failed while storage was down, and
    # checkpoints stored by a worker killed before it recorded them. Everything is stopped, so
    # no write is in flight and no age is needed here.
    logs = "".join(path.read_text(errors="replace") for path in tmp_path.glob("*.log"))
    failed_deletes = set(re.findall(r"could not delete storage object (\S+)", logs))
    swept = storage_orphans_sweep(
        older_than=timedelta(0), now=timezone.now() + timedelta(seconds=5)
    )
    referenced = (
        set(DatasetVersion.objects.values_list("storage_key", flat=True))
        | set(ModelArtifact.objects.values_list("storage_key", flat=True))
        | set(PendingUpload.objects.values_list("storage_key", flat=True))
        | set(Job.objects.exclude(checkpoint_key="").values_list("checkpoint_key", flat=True))
    )
    stored = _bucket_keys(s3)
    orphans = sorted(stored - referenced)
    missing = sorted(referenced - stored)
    if orphans:
        problems.append(f"objects no row references after the sweep: {orphans}")
    if missing:
        problems.append(f"rows whose object is gone: {missing}")

    summary = {
        "seed": seed,
        "jobs succeeded": states[JobState.SUCCEEDED],
        "jobs failed": states[JobState.FAILED],
        "jobs in other states": sum(states.values())
        - states[JobState.SUCCEEDED]
        - states[JobState.FAILED],
        "attempts": len(attempts),
        "attempts started": len(started),
        "attempts lost": outcomes[JobAttempt.Outcome.LOST],
        "attempt outcomes": dict(outcomes),
        "worker kills (and restarts)": faults["kill"],
        "redis restarts": faults["redis"],
        "s3 outages": faults["s3"],
        "ledger rows": ledger_rows.count(),
        "ledger rows charged": charged_rows,
        "ledger total (minor units)": ledger_total,
        "meter events": len(fake.meter_events),
        "meter total (minor units)": meter_total,
        "meter events sent after the run": meter_sent_at_end,
        "objects in storage": len(stored),
        "orphans swept": len(swept),
        "  left by a failed delete": len(failed_deletes & set(swept)),
        "orphans after the sweep": len(orphans),
        "missing objects": len(missing),
        "jobs ended after (s)": round(jobs_done_s, 1),
    }
    print("\n".join(f"  {name:<32}{value}" for name, value in summary.items()))
    for reason, count in failures.most_common():
        print(f"  failed x{count}: {reason}")
    if swept:
        print("  swept by prefix:", dict(Counter(_prefix(key) for key in swept)))
    assert not problems, "\n".join(problems)
