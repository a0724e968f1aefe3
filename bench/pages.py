"""Server time of every dashboard page with 100,000 jobs in the database, against a bare page.

    .venv/bin/python -m bench.pages                 # 50 organizations, 100,000 jobs; 30 repeats
    .venv/bin/python -m bench.pages --reseed        # drop the seeded database and seed it again
    .venv/bin/python -m bench.pages --quick         # smoke run: 6 organizations, 5,000 jobs

Seeds its own PostgreSQL database (`factory_saas_pages_bench`, or `..._quick` for --quick;
BENCH_PAGES_DATABASE_URL overrides it), created and migrated if missing and reused on later
runs: 50 organizations whose sizes follow a Zipf law, the largest holding 20,000 jobs (its pages
are the slowest), with members, API keys, audit events, datasets and models with versions and
aliases, sweeps, job events, attempts, logs and metrics, workers, the ledger (through
`billing.services.usage_record_many`), budgets, budget alerts and last month's invoices.

Each page is requested in-process through django.test.Client, signed in as the largest
organization's owner (a staff user for /ops/ pages), so the time is the server's: URL routing,
middleware, session, view, queries and template, with no network or browser. After a warm-up,
pages are requested round-robin --repeats times; the table gives p50 and p95 per page and its
query count. The baseline, in the same run, is the organization shell: a page that passes the
same middleware, sign-in and membership check and renders base.html with nothing in it (and
`/healthz`, which touches nothing). Target: worst p95 under 300 ms. The table goes to stdout,
ending with one `RESULT {json}` line; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.databases import drop_database, ensure_database, migrate  # noqa: E402

DATABASE_URL = os.environ.get(
    "BENCH_PAGES_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/factory_saas_pages_bench"
)
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/7")
SETTINGS_MODULE = "factory_saas.settings.test"
TARGET_P95_MS = 300.0
BIG_SLUG = "bench-org-00"
STAFF_EMAIL = "bench-staff@example.com"
PROJECTS = ["fraud", "churn", "vision", "search", "ads", "risk", "support", "pricing"]
TEAMS = ["core", "ml", "data", "platform", "growth"]
RECIPES = [  # (name, weight, dataset formats)
    ("tabular-classifier", 0.55, ("csv", "parquet")),
    ("text-classifier", 0.15, ("csv", "parquet")),
    ("timeseries-forecaster", 0.15, ("csv", "parquet")),
    ("image-classifier", 0.15, ("image_folder_zip", "npz")),
]
DATASET_FORMATS = ["csv", "parquet", "image_folder_zip", "csv", "npz", "parquet"]
WAITING_REASONS = [
    "No room: all matching GPUs are busy.",
    "At the running-job limit of your quota (10).",
    "Over the GPU limit of your quota (8).",
    "Behind higher-priority jobs of your organization.",
]


@dataclass(frozen=True)
class Scale:
    organizations: int
    jobs: int
    big_jobs: int
    days: int = 60
    workers: int = 240


FULL = Scale(organizations=50, jobs=100_000, big_jobs=20_000)
QUICK = Scale(organizations=6, jobs=5_000, big_jobs=2_000, workers=24)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed requests per page")
    parser.add_argument("--warmup", type=int, default=3, help="untimed requests per page first")
    parser.add_argument("--reseed", action="store_true", help="drop the database and seed again")
    parser.add_argument("--quick", action="store_true", help="smoke run: 5,000 jobs, 10 repeats")
    args = parser.parse_args()
    scale, url = FULL, DATABASE_URL
    if args.quick:
        scale, url = QUICK, f"{DATABASE_URL}_quick"
        args.repeats, args.warmup = min(args.repeats, 10), min(args.warmup, 2)

    env = {
        "DJANGO_SETTINGS_MODULE": SETTINGS_MODULE,
        "DATABASE_URL": url,
        "REDIS_URL": REDIS_URL,
        # As in production: one connection per process, not one per request.
        "CONN_MAX_AGE": "60",
        "STRIPE_SECRET_KEY": "",
    }
    os.environ.update(env)
    progress(f"preparing {url}")
    if args.reseed:
        drop_database(url)
    ensure_database(url)
    migrate(env)
    import django

    django.setup()
    if not seeded(scale):
        began = time.perf_counter()
        seed(scale)
        progress(f"seeded in {time.perf_counter() - began:.0f} s")
    load_before = os.getloadavg()
    results, baseline_names = measure(repeats=args.repeats, warmup=args.warmup)
    report(
        results,
        baseline_names=baseline_names,
        scale=scale,
        repeats=args.repeats,
        loads=(load_before, os.getloadavg()),
    )


# The seed


def seeded(scale: Scale) -> bool:
    from jobs.models import Job
    from tenants.models import User

    # The staff user is written last: its presence means a whole seed went in.
    if User.objects.filter(email=STAFF_EMAIL).exists() and Job.objects.count() == scale.jobs:
        progress(f"reusing the seed ({scale.jobs:,} jobs); --reseed to start again")
        return True
    if Job.objects.exists():
        raise SystemExit("the database holds a partial or different seed: run with --reseed")
    return False


def org_sizes(scale: Scale) -> list[int]:
    """Jobs per organization: the largest first, the rest by a Zipf law, at least 20 each."""
    rest = scale.organizations - 1
    weights = [1 / (k + 1) ** 0.8 for k in range(1, rest + 1)]
    total = sum(weights)
    sizes = [max(20, int((scale.jobs - scale.big_jobs) * w / total)) for w in weights]
    sizes[0] += scale.jobs - scale.big_jobs - sum(sizes)
    return [scale.big_jobs, *sizes]


@dataclass
class OrgSeed:
    organization: object
    users: list = field(default_factory=list)  # (user, role)
    keys: list = field(default_factory=list)
    versions_by_format: dict = field(default_factory=dict)
    models: list = field(default_factory=list)


def seed(scale: Scale) -> None:
    from django.db import connection

    rng = random.Random(7)  # noqa: S311 (test data, seeded to be the same every run)
    now = datetime.now(tz=UTC).replace(microsecond=0)
    sizes = org_sizes(scale)
    progress(f"seeding {scale.jobs:,} jobs over {scale.organizations} organizations {sizes[:5]}…")
    orgs = seed_tenants(rng, sizes, now=now)
    seed_registry(rng, orgs, sizes, now=now)
    workers = seed_workers(rng, scale)
    jobs = seed_jobs(rng, orgs, sizes, workers, scale=scale, now=now)
    seed_ledger(rng, orgs, jobs, now=now)
    seed_billing(orgs, now=now)
    with connection.cursor() as cursor:
        # As autovacuum would have by now: planner statistics, and a visibility map so counts
        # use index-only scans.
        cursor.execute("VACUUM ANALYZE")
    from tenants.models import User

    User.objects.create_user(email=STAFF_EMAIL, password=None, is_staff=True)


def seed_tenants(rng: random.Random, sizes: list[int], *, now: datetime) -> list[OrgSeed]:
    from tenants.models import ApiKey, AuditEvent, Invitation, Membership, Organization, User
    from tenants.selectors import hash_secret

    orgs = Organization.objects.bulk_create(
        Organization(
            name=f"Bench Org {n:02d}",
            slug=f"bench-org-{n:02d}",
            created_at=now - timedelta(days=400),
        )
        for n in range(len(sizes))
    )
    seeds = [OrgSeed(organization=org) for org in orgs]
    users, memberships, keys, invitations, events = [], [], [], [], []
    for n, (org_seed, size) in enumerate(zip(seeds, sizes, strict=True)):
        members = max(3, min(40, size // 500))
        roles = ["owner", "admin", "billing"] + [
            rng.choice(["developer", "developer", "developer", "viewer", "admin"])
            for _ in range(members - 3)
        ]
        for m, role in enumerate(roles):
            user = User(email=f"bench-{n:02d}-{m:02d}@example.com", first_name=f"User{m}")
            user.set_unusable_password()
            users.append(user)
            org_seed.users.append((user, role))
    User.objects.bulk_create(users)
    big_owner = seeds[0].users[0][0]
    for n, org_seed in enumerate(seeds):
        org = org_seed.organization
        for user, role in org_seed.users:
            memberships.append(
                Membership(
                    organization=org, user=user, role=role, created_at=now - timedelta(days=300)
                )
            )
        if 0 < n <= 4:  # the big organization's owner belongs to a few others too
            memberships.append(Membership(organization=org, user=big_owner, role="developer"))
        key_count = max(2, min(60, sizes[n] // 300))
        for k in range(key_count):
            creator = org_seed.users[k % len(org_seed.users)][0]
            created = now - timedelta(days=rng.uniform(1, 300))
            keys.append(
                ApiKey(
                    organization=org,
                    name=f"ci-{k}",
                    prefix=uuid.uuid4().hex[:12],
                    secret_hash=hash_secret(uuid.uuid4().hex),
                    scopes=["jobs:read", "jobs:write"],
                    created_by=creator,
                    created_at=created,
                    last_used_at=now - timedelta(hours=rng.uniform(0, 48)),
                    revoked_at=created + timedelta(days=1) if k % 7 == 6 else None,
                )
            )
        for i in range(3):
            invitations.append(
                Invitation(
                    organization=org,
                    email=f"invitee-{n}-{i}@example.com",
                    role="developer",
                    token_hash=hash_secret(uuid.uuid4().hex),
                    invited_by=org_seed.users[0][0],
                    expires_at=now + timedelta(days=7 - i * 5),
                )
            )
        for user, role in org_seed.users:
            events.append(
                AuditEvent(
                    organization=org,
                    actor_user=org_seed.users[0][0],
                    actor_label=org_seed.users[0][0].email,
                    action="member.add",
                    target_type="membership",
                    target_label=f"{user.email} ({role})",
                    created_at=now - timedelta(days=300),
                )
            )
    Membership.objects.bulk_create(memberships)
    ApiKey.objects.bulk_create(keys, batch_size=2000)
    Invitation.objects.bulk_create(invitations)
    AuditEvent.objects.bulk_create(events, batch_size=5000)
    by_org = {s.organization.pk: s for s in seeds}
    for key in keys:
        by_org[key.organization_id].keys.append(key)
    progress(f"  tenants: {len(users):,} users, {len(keys):,} API keys")
    return seeds


def seed_registry(rng: random.Random, seeds: list[OrgSeed], sizes, *, now: datetime) -> None:
    from registry.models import Dataset, DatasetVersion, RegisteredModel

    datasets, versions = [], []
    for n, org_seed in enumerate(seeds):
        org = org_seed.organization
        count = 40 if n == 0 else max(3, min(12, sizes[n] // 400))
        for d in range(count):
            name = "customer-events" if d == 0 else f"dataset-{d:02d}"
            dataset = Dataset(organization=org, name=name, created_at=now - timedelta(days=200 - d))
            datasets.append(dataset)
            fmt = DATASET_FORMATS[d % len(DATASET_FORMATS)]
            number_of_versions = 60 if d == 0 else rng.randint(1, 25 if n == 0 else 5)
            for v in range(1, number_of_versions + 1):
                versions.append((dataset, v, fmt))
    Dataset.objects.bulk_create(datasets)
    columns = [{"name": f"col_{c}", "type": "float" if c % 3 else "string"} for c in range(12)]
    profile = {
        c["name"]: {"nulls": 3, "min": 0.0, "max": 99.5, "mean": 42.1, "distinct": 900}
        for c in columns
    }
    preview = [{c["name"]: round(r * 1.5 + i, 2) for i, c in enumerate(columns)} for r in range(5)]
    rows = []
    for dataset, number, fmt in versions:
        rows.append(
            DatasetVersion(
                organization_id=dataset.organization_id,
                dataset=dataset,
                number=number,
                storage_key=f"orgs/{dataset.organization_id}/datasets/{uuid.uuid4().hex}/data",
                original_filename=f"{dataset.name}-{number}.{fmt}",
                size_bytes=rng.randint(10**5, 10**9),
                sha256=uuid.uuid4().hex * 2,
                format=fmt,
                row_count=rng.randint(1000, 10**7),
                schema=columns,
                profile=profile,
                preview=preview,
                created_at=dataset.created_at + timedelta(days=number),
            )
        )
    DatasetVersion.objects.bulk_create(rows, batch_size=2000)
    by_org = {s.organization.pk: s for s in seeds}
    for version in rows:
        by_org[version.organization_id].versions_by_format.setdefault(version.format, []).append(
            version
        )
    models = []
    for n, org_seed in enumerate(seeds):
        for m in range(30 if n == 0 else max(2, min(10, sizes[n] // 500))):
            models.append(
                RegisteredModel(
                    organization=org_seed.organization,
                    name="churn-model" if m == 0 else f"model-{m:02d}",
                    promotion_gates=[
                        {"alias": "production", "metric": "accuracy", "op": ">=", "value": 0.5}
                    ],
                    created_at=now - timedelta(days=200),
                )
            )
    RegisteredModel.objects.bulk_create(models)
    for model in models:
        by_org[model.organization_id].models.append(model)
    progress(f"  registry: {len(datasets):,} datasets, {len(rows):,} versions")


def seed_workers(rng: random.Random, scale: Scale) -> list:
    from jobs.models import ResourceClass, Worker

    classes = list(ResourceClass.objects.exclude(name="cpu").order_by("name"))
    statuses = [Worker.Status.ONLINE] * 17 + [
        Worker.Status.CORDONED,
        Worker.Status.DRAINING,
        Worker.Status.OFFLINE,
    ]
    workers = [
        Worker(
            name=f"bench-{classes[w % len(classes)].name}-{w:03d}",
            resource_class=classes[w % len(classes)],
            slots=8,
            queue=f"worker.bench-{w:03d}",
            status=rng.choice(statuses),
            hostname=f"gpu-host-{w:03d}",
            devices=[
                {"index": i, "name": classes[w % len(classes)].display_name} for i in range(8)
            ],
            software_version="1.0.0",
        )
        for w in range(scale.workers)
    ]
    Worker.objects.bulk_create(workers)
    return workers


def seed_jobs(rng, seeds: list[OrgSeed], sizes, workers, *, scale: Scale, now: datetime) -> list:
    """Jobs, their attempts, events, sweeps, the model versions they trained, logs and metrics."""
    from django.db import connection

    from billing.selectors import price_table
    from jobs.models import Job, JobAttempt, JobEvent, JobState, Sweep
    from registry.models import ModelAlias, ModelArtifact, ModelVersion
    from tenants.models import AuditEvent

    prices = price_table(resources={f"gpu:{w.resource_class.name}" for w in workers})
    free = {w.pk: list(range(w.slots)) for w in workers if w.status == w.Status.ONLINE}
    workers_by_class: dict[int, list] = {}
    for w in workers:
        if w.pk in free:
            workers_by_class.setdefault(w.resource_class_id, []).append(w)
    classes = sorted({w.resource_class for w in workers}, key=lambda rc: rc.name)
    base_pk = (Job.objects.order_by("-pk").values_list("pk", flat=True).first() or 0) + 1
    next_pk = base_pk
    jobs, sweeps, model_versions, attempts, events, audit = [], [], [], [], [], []
    trained_on, artifacts, aliases = [], [], []
    version_numbers: dict[int, int] = {}
    recipe_names = [r[0] for r in RECIPES]
    recipe_weights = [r[1] for r in RECIPES]
    formats = {r[0]: r[2] for r in RECIPES}
    for n, (org_seed, size) in enumerate(zip(seeds, sizes, strict=True)):
        org = org_seed.organization
        people = [u for u, role in org_seed.users if role in ("owner", "admin", "developer")]
        span = timedelta(days=scale.days).total_seconds()
        times = sorted(now - timedelta(seconds=rng.uniform(120, span)) for _ in range(size))
        queued = max(2, size // 50)
        running = max(1, size // 250)
        other_active = max(1, size // 2000)
        # The newest jobs: every other one still active, the rest finished (so the last day
        # has failures and successes too, as the operators' pages expect).
        active_from = size - 2 * (queued + running + 3 * other_active)
        sweep_count = 100 if n == 0 else max(1, size // 400)
        org_sweeps = []
        for s in range(sweep_count):
            model = rng.choice(org_seed.models)
            sweep = Sweep(
                organization=org,
                name=model.name,
                recipe="tabular-classifier",
                base_parameters={"target": "label", "epochs": 10},
                space={
                    "learning_rate": {"min": 1e-4, "max": 1e-2, "log": True},
                    "hidden_sizes": {"values": [[64, 32], [128, 64], [256]]},
                },
                strategy=Sweep.Strategy.RANDOM,
                trial_count=12,
                seed=s,
                metric="accuracy",
                created_by=people[0],
                state=Sweep.State.SUCCEEDED,
            )
            org_sweeps.append((sweep, model))
        sweeps.extend(s for s, _m in org_sweeps)
        sweep_starts = sorted(rng.sample(range(max(1, active_from - 12)), sweep_count))
        sweep_of: dict[int, tuple] = {}
        for (sweep, model), start in zip(org_sweeps, sweep_starts, strict=True):
            for i in range(start, start + 12):
                sweep_of.setdefault(i, (sweep, model))
        for i, created in enumerate(times):
            pk = next_pk
            next_pk += 1
            in_sweep = sweep_of.get(i)
            recipe = (
                "tabular-classifier"
                if in_sweep
                else rng.choices(recipe_names, weights=recipe_weights)[0]
            )
            candidates = [
                v for fmt in formats[recipe] for v in org_seed.versions_by_format.get(fmt, [])
            ] or [v for vs in org_seed.versions_by_format.values() for v in vs]
            dataset_version = rng.choice(candidates)
            resource_class = rng.choice(classes)
            gpus = rng.choices([1, 2, 4, 8], weights=[50, 25, 15, 10])[0]
            creator = rng.choice(people)
            api_key = rng.choice(org_seed.keys) if rng.random() < 0.3 else None
            labels = (
                {"project": rng.choice(PROJECTS), "team": rng.choice(TEAMS)}
                if rng.random() < 0.8
                else {}
            )
            params = {
                "target": "label",
                "epochs": rng.choice([5, 10, 20, 50]),
                "learning_rate": round(10 ** rng.uniform(-4, -2), 6),
                "hidden_sizes": rng.choice([[64, 32], [128, 64], [256]]),
            }
            job = Job(
                pk=pk,
                organization=org,
                recipe=recipe,
                recipe_version="1",
                parameters=params,
                input_dataset_version=dataset_version,
                output_model_name=in_sweep[1].name if in_sweep else "",
                resource_class=resource_class,
                gpu_count=gpus,
                priority=rng.choice([0, 0, 0, 10, -10]),
                labels=labels,
                max_runtime_s=rng.choice([3600, 7200, 14400, 86400]),
                created_by=creator if api_key is None else api_key.created_by,
                created_by_api_key=api_key,
                sweep=in_sweep[0] if in_sweep else None,
                created_at=created,
            )
            who = f"key {api_key.prefix} ({api_key.created_by.email})" if api_key else creator.email
            audit.append(
                AuditEvent(
                    organization=org,
                    actor_user=job.created_by,
                    actor_api_key=api_key,
                    actor_label=who,
                    action="job.submit",
                    target_type="job",
                    target_id=str(pk),
                    target_label=f"job {pk} ({recipe})",
                    ip="10.0.0.1",
                    data={"recipe": recipe, "gpus": gpus},
                    created_at=created,
                )
            )
            events.append(
                JobEvent(organization=org, job_id=pk, kind="submitted", created_at=created)
            )
            state = None
            if i >= active_from and (i - active_from) % 2 == 0:
                k = (i - active_from) // 2
                if k < queued:
                    state = JobState.QUEUED
                elif k < queued + running:
                    state = JobState.RUNNING
                else:
                    state = [JobState.SCHEDULED, JobState.PREEMPTED, JobState.CANCELLING][
                        (k - queued - running) % 3
                    ]
            if state is not None and state != JobState.QUEUED:
                place = next(
                    (
                        w
                        for w in workers_by_class.get(resource_class.pk, [])
                        if len(free[w.pk]) >= gpus
                    ),
                    None,
                )
                if place is None:
                    state = JobState.QUEUED
                else:
                    job.worker = place
                    job.slot_indices = [free[place.pk].pop() for _ in range(gpus)]
                    job.attempt = rng.choice([1, 1, 1, 2])
                    job.scheduled_at = created + timedelta(seconds=rng.uniform(2, 300))
                    job.lease_expires_at = now + timedelta(seconds=30)
                    if state != JobState.SCHEDULED:
                        job.started_at = job.scheduled_at + timedelta(seconds=rng.uniform(1, 20))
                    for number in range(1, job.attempt + 1):
                        attempts.append(
                            JobAttempt(
                                organization=org,
                                job_id=pk,
                                number=number,
                                worker=place,
                                slot_indices=job.slot_indices,
                                scheduled_at=job.scheduled_at,
                                started_at=job.started_at,
                                outcome=JobAttempt.Outcome.ACTIVE
                                if number == job.attempt
                                else JobAttempt.Outcome.LOST,
                                ended_at=None if number == job.attempt else job.started_at,
                            )
                        )
                    events.append(
                        JobEvent(
                            organization=org,
                            job_id=pk,
                            attempt=job.attempt,
                            kind="scheduled",
                            message=f"Placed on {place.name}.",
                            created_at=job.scheduled_at,
                        )
                    )
                    if job.started_at:
                        events.append(
                            JobEvent(
                                organization=org,
                                job_id=pk,
                                attempt=job.attempt,
                                kind="started",
                                message=f"Attempt {job.attempt} started on {place.name}.",
                                created_at=job.started_at,
                            )
                        )
            if state == JobState.QUEUED:
                job.waiting_reason = rng.choice(WAITING_REASONS)
                if rng.random() < 0.2:  # requeued after a lost worker
                    job.attempt, job.lost_attempts = 1, 1
            if state is None:
                state = rng.choices(
                    [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED],
                    weights=[72, 14, 14],
                )[0]
                never_ran = state == JobState.CANCELLED and rng.random() < 0.5
                if not never_ran:
                    job.attempt = 2 if rng.random() < 0.1 else 1
                    job.lost_attempts = job.attempt - 1
                    # Jobs are at least two minutes old: each step stays in the past, in order.
                    job.scheduled_at = min(
                        created + timedelta(seconds=rng.uniform(2, 600)), now - timedelta(minutes=1)
                    )
                    job.started_at = min(
                        job.scheduled_at + timedelta(seconds=rng.uniform(1, 30)),
                        now - timedelta(seconds=30),
                    )
                    runtime = min(rng.lognormvariate(7.5, 1.0), job.max_runtime_s)
                    job.finished_at = min(job.started_at + timedelta(seconds=runtime), now)
                    job.worker = rng.choice(workers)
                    job.slot_indices = list(range(gpus))
                    seconds = (job.finished_at - job.started_at).total_seconds()
                    price = prices[f"gpu:{resource_class.name}"][0].unit_price
                    job.cost_minor = int(Decimal(seconds * gpus) * price * 100)
                    for number in range(1, job.attempt + 1):
                        last = number == job.attempt
                        attempts.append(
                            JobAttempt(
                                organization=org,
                                job_id=pk,
                                number=number,
                                worker=job.worker,
                                slot_indices=job.slot_indices,
                                scheduled_at=job.scheduled_at,
                                started_at=job.started_at,
                                ended_at=job.finished_at,
                                outcome=(state if last else JobAttempt.Outcome.LOST),
                            )
                        )
                    events.append(
                        JobEvent(
                            organization=org,
                            job_id=pk,
                            attempt=job.attempt,
                            kind="started",
                            message=f"Attempt {job.attempt} started on {job.worker.name}.",
                            created_at=job.started_at,
                        )
                    )
                else:
                    job.finished_at = created + timedelta(seconds=rng.uniform(5, 600))
                if state == JobState.FAILED:
                    job.failure_reason = (
                        "Traceback (most recent call last):\n  File recipe.py, line 88\n"
                        "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
                    )
                events.append(
                    JobEvent(
                        organization=org,
                        job_id=pk,
                        attempt=job.attempt,
                        kind=state,
                        message=job.failure_reason[:200] or f"Job {state}.",
                        created_at=job.finished_at,
                    )
                )
                if state == JobState.CANCELLED:
                    audit.append(
                        AuditEvent(
                            organization=org,
                            actor_user=creator,
                            actor_label=creator.email,
                            action="job.cancel",
                            target_type="job",
                            target_id=str(pk),
                            target_label=f"job {pk} ({recipe})",
                            created_at=job.finished_at,
                        )
                    )
                registers = in_sweep is not None or rng.random() < 0.12
                if state == JobState.SUCCEEDED and registers:
                    model = in_sweep[1] if in_sweep else _model_for(rng, org_seed.models)
                    number = version_numbers.get(model.pk, 0) + 1
                    version_numbers[model.pk] = number
                    version = ModelVersion(
                        organization=org,
                        registered_model=model,
                        number=number,
                        recipe_name=recipe,
                        recipe_version="1",
                        parameters=params,
                        metrics={
                            "accuracy": round(rng.uniform(0.6, 0.97), 4),
                            "loss": round(rng.uniform(0.05, 0.9), 4),
                            "f1": round(rng.uniform(0.5, 0.95), 4),
                        },
                        input_signature={"columns": 12},
                        source_job_id=pk,
                        created_by=job.created_by,
                        created_at=job.finished_at,
                    )
                    model_versions.append(version)
                    job.output_model_version = version
                    trained_on.append((version, dataset_version))
            job.state = state
            jobs.append(job)
    Sweep.objects.bulk_create(sweeps, batch_size=2000)
    for job in jobs:  # the sweep's pk exists only now
        if job.sweep is not None:
            job.sweep_id = job.sweep.pk
    ModelVersion.objects.bulk_create(model_versions, batch_size=2000)
    for version in model_versions:
        for name in ("model.safetensors", "config.json"):
            artifacts.append(
                ModelArtifact(
                    organization_id=version.organization_id,
                    model_version=version,
                    name=name,
                    storage_key=f"orgs/{version.organization_id}/models/{uuid.uuid4().hex}/{name}",
                    size_bytes=rng.randint(10**4, 10**8),
                    sha256=uuid.uuid4().hex * 2,
                )
            )
    ModelArtifact.objects.bulk_create(artifacts, batch_size=5000)
    through = ModelVersion.trained_on.through
    through.objects.bulk_create(
        [through(modelversion=v, datasetversion=d) for v, d in trained_on], batch_size=5000
    )
    latest: dict[int, ModelVersion] = {}
    for version in model_versions:
        latest[version.registered_model_id] = version
    for version in latest.values():
        aliases.append(
            ModelAlias(
                organization_id=version.organization_id,
                registered_model_id=version.registered_model_id,
                name="staging",
                version=version,
            )
        )
        if version.number > 2:
            earlier = next(
                v
                for v in model_versions
                if v.registered_model_id == version.registered_model_id
                and v.number == version.number - 2
            )
            aliases.append(
                ModelAlias(
                    organization_id=version.organization_id,
                    registered_model_id=version.registered_model_id,
                    name="production",
                    version=earlier,
                )
            )
    ModelAlias.objects.bulk_create(aliases)
    for job in jobs:
        if job.output_model_version is not None:
            job.output_model_version_id = job.output_model_version.pk
    Job.objects.bulk_create(jobs, batch_size=2000)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT setval(pg_get_serial_sequence('jobs_job', 'id'), "
            "(SELECT max(id) FROM jobs_job))"
        )
    progress(f"  jobs: {len(jobs):,}, {len(model_versions):,} model versions")
    JobAttempt.objects.bulk_create(attempts, batch_size=5000)
    JobEvent.objects.bulk_create(events, batch_size=5000)
    AuditEvent.objects.bulk_create(audit, batch_size=5000)
    progress(f"  {len(attempts):,} attempts, {len(events):,} job events, {len(audit):,} audits")
    best = {}
    for job in jobs:
        if job.sweep_id and job.output_model_version is not None:
            score = job.output_model_version.metrics["accuracy"]
            if job.sweep_id not in best or score > best[job.sweep_id][0]:
                best[job.sweep_id] = (score, job.pk)
    for sweep in sweeps:
        if sweep.pk in best:
            sweep.best_job_id = best[sweep.pk][1]
        sweep.finished_at = now - timedelta(days=1)
    Sweep.objects.bulk_update(sweeps, ["best_job", "finished_at"], batch_size=500)
    seed_logs_and_metrics(rng, jobs, now=now)
    return jobs


def _model_for(rng: random.Random, models: list):
    # The first model gets a quarter of the versions, so one model has far more than a page.
    return models[0] if rng.random() < 0.25 else rng.choice(models)


def seed_logs_and_metrics(rng: random.Random, jobs: list, *, now: datetime) -> None:
    """A long log and four metric series for the big organization's featured job; a few others."""
    from jobs.models import JobLog, JobMetric, JobState

    big_org = jobs[0].organization_id
    done = [
        j
        for j in jobs
        if j.organization_id == big_org and j.state == JobState.SUCCEEDED and j.output_model_version
    ]
    featured = done[-1]
    others = rng.sample(done[:-1], min(20, len(done) - 1))
    logs, metrics = [], []
    for job, lines, steps in [(featured, 5000, 2000)] + [(j, 300, 200) for j in others]:
        for i in range(lines):
            logs.append(
                JobLog(
                    organization_id=job.organization_id,
                    job_id=job.pk,
                    attempt=job.attempt,
                    line=f"epoch {i // 100} step {i}: loss={1 / (i + 1):.5f} lr=0.001 "
                    f"throughput={rng.uniform(900, 1100):.0f} samples/s",
                    created_at=job.started_at + timedelta(seconds=i),
                )
            )
        for step in range(steps):
            for name, split in [
                ("loss", "train"),
                ("loss", "val"),
                ("accuracy", "val"),
                ("lr", ""),
            ]:
                metrics.append(
                    JobMetric(
                        organization_id=job.organization_id,
                        job_id=job.pk,
                        attempt=job.attempt,
                        step=step,
                        name=name,
                        split=split,
                        value=math.exp(-step / 500) + rng.uniform(0, 0.05),
                        created_at=job.started_at + timedelta(seconds=step),
                    )
                )
    JobLog.objects.bulk_create(logs, batch_size=5000)
    JobMetric.objects.bulk_create(metrics, batch_size=5000)
    progress(f"  {len(logs):,} log lines, {len(metrics):,} metric points")


def seed_ledger(rng: random.Random, seeds: list[OrgSeed], jobs: list, *, now: datetime) -> None:
    """One ledger row per billed attempt and an hour of storage per organization and hour."""
    from billing.models import UsageRecord
    from billing.services import usage_record_many
    from jobs.models import JobState

    rows = []
    for job in jobs:
        if (
            job.finished_at is None
            or job.started_at is None
            or job.state
            not in (
                JobState.SUCCEEDED,
                JobState.FAILED,
                JobState.CANCELLED,
            )
        ):
            continue
        seconds = Decimal((job.finished_at - job.started_at).total_seconds() * job.gpu_count)
        rows.append(
            UsageRecord(
                organization_id=job.organization_id,
                resource=f"gpu:{job.resource_class.name}",
                quantity=seconds,
                unit="gpu_second",
                period_start=job.started_at,
                period_end=job.finished_at,
                idempotency_key=f"job:{job.pk}:attempt:{job.attempt}",
                source_type="job_attempt",
                source_id=str(job.pk),
                attempt=job.attempt,
                user_id=job.created_by_id,
                api_key_id=job.created_by_api_key_id,
                labels=job.labels,
                model_name=job.output_model_name,
                created_at=job.finished_at,  # recorded as the attempt ended
            )
        )
    month_start = now.replace(day=1, hour=0, minute=0, second=0)
    hours = int((now - month_start).total_seconds() // 3600)
    for org_seed in seeds:
        used = rng.randint(10**9, 10**12)
        for h in range(hours):
            start = month_start + timedelta(hours=h)
            rows.append(
                UsageRecord(
                    organization_id=org_seed.organization.pk,
                    resource="storage",
                    quantity=Decimal(used) / Decimal(10**9) / Decimal(730),
                    unit="gb_month",
                    period_start=start,
                    period_end=start + timedelta(hours=1),
                    idempotency_key=f"storage:{org_seed.organization.pk}:{start:%Y-%m-%dT%H}",
                    source_type="storage",
                    source_id=str(org_seed.organization.pk),
                    labels={"bytes": str(used)},
                    created_at=start + timedelta(hours=1),
                )
            )
    began = time.perf_counter()
    batch = 1000
    for first in range(0, len(rows), batch):
        usage_record_many(rows=rows[first : first + batch])
    elapsed = time.perf_counter() - began
    progress(f"  ledger: {len(rows):,} rows through usage_record_many in {elapsed:.0f} s")


def seed_billing(seeds: list[OrgSeed], *, now: datetime) -> None:
    """Accounts, budgets (the big organization past 80%), alerts, last month's invoices."""
    from billing import invoicing, services
    from billing.selectors import billing_month, month_spend
    from tenants.actors import Actor

    for n, org_seed in enumerate(seeds):
        org = org_seed.organization
        services.billing_account_ensure(organization=org)
        if n % 3 == 0:
            spend = month_spend(organization=org, at=now)
            ratio = Decimal("0.85") if n == 0 else Decimal("1.5")
            services.budget_set(
                organization=org,
                actor=Actor(user=org_seed.users[0][0]),
                monthly_budget_minor=max(int(spend / ratio), 100),
                thresholds=[50, 80, 100],
                hard_cap=False,
                billing_email=f"billing-{n:02d}@example.com",
            )
    alerts = services.budget_alerts_check(now=now)
    last_month = (billing_month(now) - timedelta(days=1)).replace(day=1)
    issued = invoicing.invoices_issue(month=last_month)
    progress(f"  billing: {alerts} budget alerts, {issued} invoices for {last_month:%Y-%m}")


# The measurement


def pages(staff: bool) -> list[tuple[str, str, dict]]:
    """(name, path, extra request headers) for every page measured, the baselines first."""
    from django.db.models import Count
    from django.urls import Resolver404, resolve, reverse

    from billing.models import Invoice
    from jobs.models import JobLog, Sweep
    from registry.models import Dataset, DatasetVersion, ModelVersion, RegisteredModel
    from tenants.models import Organization

    org = Organization.objects.get(slug=BIG_SLUG)
    slug = org.slug
    job_id = (
        JobLog.objects.for_organization(org)
        .values("job")
        .annotate(n=Count("id"))
        .order_by("-n")
        .first()["job"]
    )
    sweep = (
        Sweep.objects.for_organization(org).annotate(n=Count("trials")).order_by("-n", "pk").first()
    )
    dataset = (
        Dataset.objects.for_organization(org)
        .annotate(n=Count("versions"))
        .order_by("-n", "name")
        .first()
    )
    dataset_version = DatasetVersion.objects.filter(dataset=dataset).order_by("-number").first()
    model = (
        RegisteredModel.objects.for_organization(org)
        .annotate(n=Count("versions"))
        .order_by("-n", "name")
        .first()
    )
    model_version = ModelVersion.objects.filter(registered_model=model).order_by("-number")
    latest, earlier = model_version[0], model_version[3]
    invoice = Invoice.objects.for_organization(org).order_by("-period_start").first()

    def url(name, *args, query=""):
        return reverse(name, args=[slug, *args]) + (f"?{query}" if query else "")

    items = [
        ("baseline: /healthz", "/healthz", {}),
        ("baseline: org shell (base.html)", url("bench_org_shell"), {}),
        ("overview", url("tenants:overview"), {}),
        ("jobs", url("jobs:jobs"), {}),
        ("jobs ?state=failed", url("jobs:jobs", query="state=failed"), {}),
        ("jobs ?label=project=fraud", url("jobs:jobs", query="label=project%3Dfraud"), {}),
        ("jobs ?page=50", url("jobs:jobs", query="page=50"), {}),
        ("job (events, logs, metrics)", url("jobs:job", job_id), {}),
        ("job live part (htmx poll)", url("jobs:job", job_id), {"HTTP_HX_REQUEST": "true"}),
        ("job submit form", url("jobs:job_submit"), {}),
        (
            "job submit ?recipe=tabular",
            url("jobs:job_submit", query="recipe=tabular-classifier"),
            {},
        ),
        ("predict form", url("jobs:job_predict"), {}),
        ("sweeps", url("jobs:sweeps"), {}),
        ("sweep", url("jobs:sweep", sweep.pk), {}),
        ("datasets", url("registry:datasets"), {}),
        ("dataset", url("registry:dataset", dataset.name), {}),
        (
            "dataset version",
            url("registry:dataset_version", dataset.name, dataset_version.number),
            {},
        ),
        ("models", url("registry:models"), {}),
        ("model", url("registry:model", model.name), {}),
        ("model version", url("registry:model_version", model.name, latest.number), {}),
        (
            "model ?compare=2 versions",
            url(
                "registry:model",
                model.name,
                query=f"compare={latest.number}&compare={earlier.number}",
            ),
            {},
        ),
        ("billing", url("billing:billing"), {}),
        ("usage (month by resource)", url("billing:usage"), {}),
        ("usage (month by day)", url("billing:usage", query="group_by=day"), {}),
        ("usage (month by job)", url("billing:usage", query="group_by=job"), {}),
        ("invoice", url("billing:invoice", invoice.pk), {}),
        ("members", url("tenants:members"), {}),
        ("API keys", url("tenants:api_keys"), {}),
        ("audit", url("tenants:audit"), {}),
        ("audit ?action=job.cancel", url("tenants:audit", query="action=job.cancel"), {}),
        ("audit ?actor=bench-00-05", url("tenants:audit", query="actor=bench-00-05"), {}),
        ("audit ?page=100", url("tenants:audit", query="page=100"), {}),
        ("settings", url("tenants:settings"), {}),
        ("profile", reverse("tenants:profile"), {}),
        ("new organization form", reverse("tenants:organization_create"), {}),
        ("invitation", reverse("tenants:invitation_accept"), {}),
    ]
    if staff:
        items.append(("ops: pool", reverse("ops_pool"), {"staff": True}))
        items.append(("ops: billing", reverse("ops_billing"), {"staff": True}))
        with contextlib.suppress(Resolver404):  # /ops/ is new: measured once it exists
            resolve("/ops/")
            items.append(("ops: overview", "/ops/", {"staff": True}))
    return items


def unmeasured_routes(measured_names: set[str]) -> list[str]:
    """Named routes that answer GET with a page but are not in the list (new pages show up here)."""
    from django.urls import URLPattern, URLResolver, get_resolver

    # Dashboard pages only: the API, the admin and sign-in are other benchmarks' business, and
    # downloads and Stripe redirects are not pages.
    namespaces = ("tenants", "registry", "jobs", "billing")
    skipped = ("download", "pdf", "csv", "checkout", "portal")
    found = []

    def walk(patterns, namespace):
        for p in patterns:
            if isinstance(p, URLResolver):
                walk(p.url_patterns, p.namespace or namespace)
            elif isinstance(p, URLPattern) and p.name:
                view = getattr(p.callback, "view_class", None)
                gets = view is not None and (
                    "get" in getattr(view, "required_scopes", {})
                    or (hasattr(view, "get") and not getattr(view, "required_scopes", None))
                )
                name = f"{namespace}:{p.name}" if namespace else p.name
                dashboard = namespace in namespaces or name.startswith("ops")
                if (
                    gets
                    and dashboard
                    and not any(s in name for s in skipped)
                    and name not in measured_names
                ):
                    found.append(name)

    walk(get_resolver().url_patterns, None)
    return sorted(set(found))


@dataclass
class PageResult:
    name: str
    path: str
    times_ms: list[float]
    queries: int
    size_kb: float

    @property
    def p50(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def p95(self) -> float:
        ordered = sorted(self.times_ms)
        return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def measure(*, repeats: int, warmup: int) -> tuple[list[PageResult], set[str]]:
    from django.db import connection
    from django.test import Client, override_settings
    from django.test.utils import CaptureQueriesContext
    from django.urls import resolve

    from tenants.models import Membership, User

    owner = (
        Membership.objects.filter(organization__slug=BIG_SLUG, role="owner")
        .select_related("user")
        .order_by("pk")
        .first()
        .user
    )
    staff = User.objects.get(email=STAFF_EMAIL)
    with override_settings(ROOT_URLCONF="bench.pages_urls"):
        clients = {False: Client(SERVER_NAME="localhost"), True: Client(SERVER_NAME="localhost")}
        clients[False].force_login(owner)
        clients[True].force_login(staff)
        items = pages(staff=True)
        measured = set()
        for _name, path, _headers in items:
            match = resolve(path.split("?")[0])
            measured.add(
                f"{match.namespace}:{match.url_name}" if match.namespace else match.url_name
            )
        missing = unmeasured_routes(measured)
        if missing:
            progress(f"pages with GET not measured: {', '.join(missing)}")

        def get(path, headers):
            headers = dict(headers)
            client = clients[headers.pop("staff", False)]
            response = client.get(path, **headers)
            if response.status_code != 200:
                raise SystemExit(f"GET {path}: {response.status_code}")
            return response

        progress(f"warming up {len(items)} pages ({warmup} requests each)")
        for _ in range(warmup):
            for _name, path, headers in items:
                get(path, headers)
        times: dict[str, list[float]] = {name: [] for name, _p, _h in items}
        progress(f"timing {len(items)} pages x {repeats}, round-robin")
        for _ in range(repeats):
            for name, path, headers in items:
                began = time.perf_counter()
                get(path, headers)
                times[name].append((time.perf_counter() - began) * 1000)
        results = []
        for name, path, headers in items:
            with CaptureQueriesContext(connection) as queries:
                response = get(path, headers)
            results.append(
                PageResult(
                    name=name,
                    path=path,
                    times_ms=times[name],
                    queries=len(queries),
                    size_kb=len(response.content) / 1024,
                )
            )
    return results, {name for name, _p, _h in items if name.startswith("baseline")}


def report(results: list[PageResult], *, baseline_names, scale: Scale, repeats: int, loads) -> None:
    from jobs.models import Job
    from tenants.models import Organization

    big = Job.objects.filter(organization__slug=BIG_SLUG).count()
    print(
        f"Dashboard pages: {Job.objects.count():,} jobs in {Organization.objects.count()} "
        f"organizations (the measured one holds {big:,}); {repeats} timed requests per page "
        f"in-process (django.test.Client), round-robin after a warm-up; "
        f"load average {loads[0][0]:.2f} before, {loads[1][0]:.2f} after"
    )
    print()
    width = max(len(r.name) for r in results) + 2
    print(f"  {'page':<{width}}{'p50 ms':>9}{'p95 ms':>9}{'queries':>9}{'KiB':>8}  path")
    for r in results:
        print(
            f"  {r.name:<{width}}{r.p50:>9.1f}{r.p95:>9.1f}{r.queries:>9}{r.size_kb:>8.0f}  "
            f"{r.path}"
        )
    pages_only = [r for r in results if r.name not in baseline_names]
    worst = max(pages_only, key=lambda r: r.p95)
    shell = next(r for r in results if r.name.startswith("baseline: org"))
    met = "met" if worst.p95 < TARGET_P95_MS else "missed"
    print()
    print(f"  worst p95: {worst.p95:.1f} ms ({worst.name}); target < {TARGET_P95_MS:.0f} ms: {met}")
    print(f"  baseline org shell p50 {shell.p50:.1f} ms, p95 {shell.p95:.1f} ms")
    result = {
        "pages": {
            r.name: {"p50_ms": round(r.p50, 1), "p95_ms": round(r.p95, 1), "queries": r.queries}
            for r in pages_only
        },
        "worst_p95_ms": round(worst.p95, 1),
        "baseline": {
            r.name.removeprefix("baseline: "): {
                "p50_ms": round(r.p50, 1),
                "p95_ms": round(r.p95, 1),
            }
            for r in results
            if r.name in baseline_names
        },
        "jobs": scale.jobs,
    }
    print(f"RESULT {json.dumps(result)}")


# The database


if __name__ == "__main__":
    main()
