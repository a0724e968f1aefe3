"""The REST API under load: many API-key clients against gunicorn with production settings.

    .venv/bin/python -m bench.load              # full run, about 4.5 minutes
    .venv/bin/python -m bench.load --quick      # smoke run, under a minute
    .venv/bin/python -m bench.load --reseed     # drop the seeded database and seed it again

Seeds its own PostgreSQL database (`factory_saas_load_bench`; BENCH_LOAD_DATABASE_URL overrides
it), created and migrated if missing and reused later: 8 organizations, each with an owner, 4
admins and one API key per admin (jobs:read, jobs:write, billing:read), a CSV dataset version
(rows only: submit never reads the file), 1,000 jobs over 30 days (5 running with their
attempt, 3 queued, the rest finished), the ledger of the finished jobs plus hourly storage rows,
and a quota with no queued-jobs cap that matters (the bench queues thousands of jobs; nothing
schedules them: no beat, no pool worker). Jobs that earlier runs submitted are deleted first.

Starts gunicorn (`bench.load_settings`: production settings plus two baseline routes;
`--workers` sync workers, 3 by default, the production image's default: with 2 vCPUs a sync
worker waits on PostgreSQL for part of each request, so one more worker than cores keeps them
busy, and more would only add switching while the clients and PostgreSQL share the same two
cores) on a free port, with CONN_MAX_AGE=60, Redis db 11 (cache and the Celery broker: each
submit sends one `tick_soon` message; flushed before and after; BENCH_LOAD_REDIS_URL overrides
it, so two benches on one Redis need not flush each other's).

Clients run in `--client-procs` spawned processes (2), threads in each, every client with its
own API key and its own organization's URLs, one new connection per request (sync gunicorn
closes every connection) and `X-Forwarded-Proto: https`, which production trusts from its proxy.
Endpoints: POST jobs/ (submit, a unique Idempotency-Key each), GET jobs/ (list, first page of
50), GET jobs/<id>/ (cycling over the organization's 50 newest jobs), GET billing/usage/
(month to date by resource); baselines on the same server: `bare DRF` (constant JSON behind an
API key read through the ORM, as a DRF app reads one and as the product did when the targets
were set), `bare key` (the same behind the product's own authentication, the floor of every API
request) and `bare open` (no authentication); bench/load_urls.py.

Phases: a ramp (closed loop, 1 to 32 clients) per endpoint; then rounds at 32 clients, the
endpoints interleaved, whose median is the table (reads before submits, so the job list shows
the seeded jobs); then submit open-loop at half its maximum throughput (the median of its
rounds): requests start on a fixed schedule whatever the replies do, and latency counts from the
scheduled start, so a stalled server cannot hide its queue. Beside each figure, the CPU time per
request of the gunicorn workers and of the database's PostgreSQL backends (from /proc), which
the machine's other load moves far less than throughput. The table goes to stdout, ending with
one `RESULT {json}` line; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from multiprocessing import get_context
from pathlib import Path
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.databases import drop_database, ensure_database, migrate  # noqa: E402
from bench.gunicorn import gunicorn  # noqa: E402

DATABASE_URL = os.environ.get(
    "BENCH_LOAD_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/factory_saas_load_bench"
)
REDIS_URL = os.environ.get("BENCH_LOAD_REDIS_URL", "redis://127.0.0.1:6379/11")
SETTINGS_MODULE = "bench.load_settings"
ORGS = 8
ADMINS_PER_ORG = 4
JOBS_PER_ORG = 1000
RUNNING_PER_ORG = 5
QUEUED_PER_ORG = 3
SUBMIT_KEY_PREFIX = "load-"
TARGET_SUBMIT_P99_MS = 100.0
TARGET_READ_RATIO = 0.7
BASELINES = ("bare_open", "bare_drf", "bare_key")
READS = ("job_get", "job_list", "usage")
SUBMIT = "job_submit"
EXPECTED_STATUS = {SUBMIT: 201}
SUBMIT_BODY = json.dumps(
    {
        "recipe": "tabular-classifier",
        "parameters": {"target": "label"},
        "dataset": {"dataset": "events", "number": 1},
        "labels": {"team": "load"},
    }
).encode()


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Plan:
    ramp_levels: tuple[int, ...]
    ramp_s: float
    clients: int
    rounds: int
    round_s: float
    half_load_s: float
    warm_s: float = 0.5


FULL = Plan(
    ramp_levels=(1, 2, 4, 8, 32),
    ramp_s=2.0,
    clients=32,
    rounds=3,
    round_s=4.0,
    half_load_s=30.0,
)
QUICK = Plan(ramp_levels=(1, 8, 32), ramp_s=1.0, clients=32, rounds=1, round_s=2.0, half_load_s=8.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, under a minute")
    parser.add_argument("--reseed", action="store_true", help="drop the database and seed again")
    parser.add_argument("--workers", type=int, default=3, help="gunicorn sync workers")
    parser.add_argument("--client-procs", type=int, default=2, help="client processes")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL

    env = {
        "DJANGO_SETTINGS_MODULE": SETTINGS_MODULE,
        "SECRET_KEY": "load-bench-" + "x" * 40,
        "DATABASE_URL": DATABASE_URL,
        "REDIS_URL": REDIS_URL,
        "ALLOWED_HOSTS": "127.0.0.1",
        "CONN_MAX_AGE": "60",
        "DEFAULT_QUOTA_MAX_QUEUED_JOBS": "1000000",
        "STRIPE_SECRET_KEY": "",
    }
    os.environ.update(env)
    progress(f"preparing {DATABASE_URL}")
    if args.reseed:
        drop_database(DATABASE_URL)
    ensure_database(DATABASE_URL)
    migrate(env)
    import django

    django.setup()
    if not seeded():
        began = time.perf_counter()
        seed()
        progress(f"seeded in {time.perf_counter() - began:.0f} s")
    forget_submitted()
    clients = client_specs()
    flush_redis()
    from django.db import connections

    connections.close_all()

    load_before = os.getloadavg()
    with (
        tempfile.TemporaryDirectory(prefix="load-bench-") as tmp,
        running_gunicorn(env, workers=args.workers, tmp=Path(tmp)) as server,
        ProcessPoolExecutor(max_workers=args.client_procs, mp_context=get_context("spawn")) as pool,
    ):
        list(pool.map(time.sleep, [0.2] * args.client_procs))  # spawn them now
        runner = Runner(pool=pool, server=server, procs=args.client_procs, clients=clients)
        figures = measure(runner, plan)
    flush_redis()
    report(figures, plan=plan, args=args, loads=(load_before, os.getloadavg()))


# The load


@dataclass
class Step:
    endpoint: str
    requests: int  # completed in the window
    errors: int
    seconds: float
    latencies_ms: list[float]
    client_cpu_s: float
    late: int = 0  # open loop: started more than 5 ms after their scheduled time
    total: int = 0  # completed in the whole step, warm-up included (what the CPU figures cover)
    web_cpu_s: float = 0.0  # gunicorn workers, over the whole step
    db_cpu_s: float = 0.0  # this database's PostgreSQL backends, over the whole step

    def per_request_ms(self, seconds: float) -> float:
        return seconds / max(1, self.total) * 1000

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def pct(self, q: float) -> float:
        return percentile(self.latencies_ms, q)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


class Runner:
    def __init__(self, *, pool, server: Server, procs: int, clients: dict[str, list[dict]]) -> None:
        self.pool, self.server, self.procs, self.clients = pool, server, procs, clients

    def run(
        self, endpoint: str, *, clients: int, seconds: float, warm_s: float, rate: float = 0.0
    ) -> Step:
        """`clients` closed-loop clients for warm_s + seconds, or an open loop at `rate` req/s
        spread over them; what finishes (closed) or is scheduled (open) in the window counts."""
        specs = self.clients[endpoint][:clients]
        if len(specs) < clients:
            specs = [specs[n % len(specs)] for n in range(clients)]
        start_at = time.monotonic() + 0.3
        tasks = []
        for p in range(self.procs):
            mine = specs[p :: self.procs]
            if not mine:
                continue
            tasks.append(
                {
                    "port": self.server.port,
                    "clients": mine,
                    "expected": EXPECTED_STATUS.get(endpoint, 200),
                    "start_at": start_at,
                    "warm_s": warm_s,
                    "seconds": seconds,
                    # Open loop: process p takes every procs-th slot of one evenly spaced schedule.
                    "rate": rate / self.procs if rate else 0.0,
                    "offset_s": p / rate if rate else 0.0,
                }
            )
        web_before, db_before = self.server.cpu()
        parts = list(self.pool.map(client_process, tasks))
        web_after, db_after = self.server.cpu()
        return Step(
            endpoint=endpoint,
            requests=sum(part["count"] for part in parts),
            errors=sum(part["errors"] for part in parts),
            seconds=seconds,
            latencies_ms=[ms for part in parts for ms in part["latencies_ms"]],
            client_cpu_s=sum(part["cpu_s"] for part in parts),
            late=sum(part["late"] for part in parts),
            total=sum(part["total"] for part in parts),
            web_cpu_s=cpu_used(web_before, web_after),
            db_cpu_s=cpu_used(db_before, db_after),
        )


def measure(runner: Runner, plan: Plan) -> dict:
    reads = [*BASELINES, *READS]
    ramp: dict[str, list[tuple[int, Step]]] = {}
    rounds: dict[str, list[Step]] = {name: [] for name in [*reads, SUBMIT]}

    def ramp_of(endpoint: str) -> None:
        ramp[endpoint] = []
        for level in plan.ramp_levels:
            step = runner.run(endpoint, clients=level, seconds=plan.ramp_s, warm_s=plan.warm_s)
            ramp[endpoint].append((level, step))
            progress(
                f"ramp {endpoint:10} {level:3} clients: {step.rps:7.1f} req/s, "
                f"p50 {step.pct(50):6.1f} ms, p99 {step.pct(99):7.1f} ms, errors {step.errors}"
            )

    def rounds_of(endpoints: list[str]) -> None:
        for number in range(plan.rounds):
            turned = endpoints[number % len(endpoints) :] + endpoints[: number % len(endpoints)]
            for endpoint in turned:
                step = runner.run(
                    endpoint, clients=plan.clients, seconds=plan.round_s, warm_s=plan.warm_s
                )
                rounds[endpoint].append(step)
                progress(
                    f"round {number + 1} {endpoint:10} {plan.clients} clients: "
                    f"{step.rps:7.1f} req/s, p50 {step.pct(50):6.1f} ms, "
                    f"p99 {step.pct(99):7.1f} ms, errors {step.errors}"
                )

    for endpoint in reads:
        ramp_of(endpoint)
    rounds_of(reads)
    ramp_of(SUBMIT)
    rounds_of([SUBMIT])

    # The sustained maximum: the median of the rounds at 32 clients. The ramp's 2 s steps
    # swing by 2x on a shared machine, so their peak is not one.
    submit_max = statistics.median(step.rps for step in rounds[SUBMIT])
    rate = submit_max / 2
    progress(f"submit open loop at {rate:.1f} req/s for {plan.half_load_s:.0f} s")
    half = runner.run(
        SUBMIT,
        clients=plan.clients,
        seconds=plan.half_load_s,
        warm_s=plan.warm_s * 2,
        rate=rate,
    )
    progress(
        f"half load: {half.rps:.1f} req/s, p50 {half.pct(50):.1f} ms, p99 {half.pct(99):.1f} ms, "
        f"late starts {half.late}, errors {half.errors}"
    )
    return {"ramp": ramp, "rounds": rounds, "submit_max": submit_max, "half": half}


# The client side: runs in spawned processes, so it imports nothing of Django.


def client_process(task: dict) -> dict:
    port, expected = task["port"], task["expected"]
    start_at, warm_s, seconds = task["start_at"], task["warm_s"], task["seconds"]
    window = (start_at + warm_s, start_at + warm_s + seconds)
    results: list[tuple[float, float, bool]] = []  # (counted-at, latency s, ok)
    late = [0]
    lock = threading.Lock()

    def one(client: dict, n: int) -> tuple[float, bool]:
        """(completion time, ok) of one request."""
        method, target, body = client["method"], client["targets"][n % len(client["targets"])], None
        headers = {"Authorization": f"Bearer {client['key']}"} if client["key"] else {}
        headers["X-Forwarded-Proto"] = "https"
        if method == "POST":
            body = client["body"]
            headers["Content-Type"] = "application/json"
            headers["Idempotency-Key"] = f"{SUBMIT_KEY_PREFIX}{uuid.uuid4().hex}"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            conn.request(method, target, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            ok = response.status == expected
        except (OSError, http.client.HTTPException):
            ok = False
        finally:
            conn.close()
        return time.monotonic(), ok

    def closed(client: dict) -> None:
        mine = []
        n = random.randrange(len(client["targets"]))  # noqa: S311 (spreads the targets)
        _sleep_until(start_at)
        while True:
            sent = time.monotonic()
            if sent >= window[1]:
                break
            done, ok = one(client, n)
            n += 1
            mine.append((done, done - sent, ok))
        with lock:
            results.extend(mine)

    schedule = {"next": 0}
    rate, offset = task["rate"], task["offset_s"]

    def opened(client: dict) -> None:
        mine = []
        n = 0
        while True:
            with lock:
                i = schedule["next"]
                schedule["next"] += 1
            due = start_at + offset + i / rate
            if due >= window[1]:
                break
            now = time.monotonic()
            if now < due:
                _sleep_until(due)
            elif now - due > 0.005:
                with lock:
                    late[0] += 1
            done, ok = one(client, n)
            n += 1
            mine.append((due, done - due, ok))
        with lock:
            results.extend(mine)

    cpu_before = time.process_time()
    threads = [
        threading.Thread(target=opened if rate else closed, args=(client,))
        for client in task["clients"]
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cpu_s = time.process_time() - cpu_before
    counted = [r for r in results if window[0] <= r[0] < window[1]]
    return {
        "count": len(counted),
        "errors": sum(1 for r in counted if not r[2]),
        "latencies_ms": [r[1] * 1000 for r in counted],
        "cpu_s": cpu_s,
        "late": late[0],
        "total": len(results),
    }


def _sleep_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        time.sleep(delay)


# The seed


def token_for(org: int, admin: int) -> tuple[str, str]:
    """(prefix, full token) of a seeded key: derived from its place, so a reused seed has them."""
    prefix = f"lb{org:02d}{admin:02d}" + hashlib.sha256(f"p{org}.{admin}".encode()).hexdigest()[:8]
    secret = hashlib.sha256(f"load-bench-{org}-{admin}".encode()).hexdigest()
    return prefix, f"{prefix}_{secret}"


def seeded() -> bool:
    from tenants.models import Organization

    count = Organization.objects.filter(slug__startswith="load-org-").count()
    if count == ORGS:
        progress("reusing the seed; --reseed to start again")
        return True
    if count:
        raise SystemExit("the database holds a partial seed: run with --reseed")
    return False


def seed() -> None:
    from django.db import connection, transaction

    from billing.models import UsageRecord
    from billing.services import usage_record_many
    from jobs.models import Job, JobAttempt, JobState, Quota, ResourceClass, Worker
    from registry.models import Dataset, DatasetVersion
    from tenants.models import ApiKey, Membership, Organization, User
    from tenants.selectors import hash_secret

    rng = random.Random(11)  # noqa: S311 (test data, the same every run)
    now = datetime.now(tz=UTC).replace(microsecond=0)
    cpu = ResourceClass.objects.get(name="cpu")
    progress(f"seeding {ORGS} organizations, {ORGS * JOBS_PER_ORG:,} jobs")
    with transaction.atomic():
        workers = [
            Worker.objects.create(
                name=f"load-w-{n}", resource_class=cpu, slots=8, queue=f"worker.load-w-{n}"
            )
            for n in range(4)
        ]
        ledger = []
        for o in range(ORGS):
            org = Organization.objects.create(
                name=f"Load Org {o}", slug=f"load-org-{o}", created_at=now - timedelta(days=200)
            )
            owner = User.objects.create_user(email=f"load-owner-{o}@example.com", password=None)
            Membership.objects.create(organization=org, user=owner, role="owner")
            for a in range(ADMINS_PER_ORG):
                admin = User.objects.create_user(
                    email=f"load-admin-{o}-{a}@example.com", password=None
                )
                Membership.objects.create(organization=org, user=admin, role="admin")
                prefix, token = token_for(o, a)
                ApiKey.objects.create(
                    organization=org,
                    name=f"load-{a}",
                    prefix=prefix,
                    secret_hash=hash_secret(token.partition("_")[2]),
                    scopes=["jobs:read", "jobs:write", "billing:read"],
                    created_by=admin,
                )
            Quota.objects.update_or_create(
                organization=org,
                resource_class=cpu,
                defaults={"limit_gpus": 8, "max_running_jobs": 10, "max_queued_jobs": 1_000_000},
            )
            dataset = Dataset.objects.create(organization=org, name="events", created_by=owner)
            columns = [{"name": f"col_{c}", "type": "float"} for c in range(11)]
            version = DatasetVersion.objects.create(
                organization=org,
                dataset=dataset,
                number=1,
                storage_key=f"load-bench/{org.pk}/events/1",
                original_filename="events.csv",
                size_bytes=12_000_000,
                sha256="0" * 64,
                format="csv",
                row_count=100_000,
                schema=[*columns, {"name": "label", "type": "string"}],
                profile={c["name"]: {"nulls": 0, "mean": 1.5} for c in columns},
                preview=[{c["name"]: 1.5 for c in columns}] * 5,
                created_by=owner,
            )
            keys = list(ApiKey.objects.filter(organization=org))
            jobs = []
            for j in range(JOBS_PER_ORG):
                newest = JOBS_PER_ORG - 1 - j  # 0 is the newest
                created = now - timedelta(minutes=10 + newest * 43)
                if newest < RUNNING_PER_ORG:
                    state = JobState.RUNNING
                elif newest < RUNNING_PER_ORG + QUEUED_PER_ORG:
                    state = JobState.QUEUED
                else:
                    state = rng.choices(
                        [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED], [85, 10, 5]
                    )[0]
                key = keys[j % len(keys)]
                started = created + timedelta(seconds=rng.randint(5, 120))
                finished = started + timedelta(seconds=rng.randint(60, 1800))
                jobs.append(
                    Job(
                        organization=org,
                        recipe="tabular-classifier",
                        recipe_version="1",
                        parameters={"target": "label", "epochs": 20},
                        input_dataset_version=version,
                        output_model_name="tabular-classifier-events",
                        resource_class=cpu,
                        labels={"team": rng.choice(["core", "ml", "data"])},
                        state=state,
                        created_by=key.created_by,
                        created_by_api_key=key,
                        created_at=created,
                        scheduled_at=None if state == JobState.QUEUED else started,
                        started_at=None if state == JobState.QUEUED else started,
                        finished_at=finished if state not in ACTIVE_OR_QUEUED else None,
                        attempt=0 if state == JobState.QUEUED else 1,
                        worker=workers[j % len(workers)] if state == JobState.RUNNING else None,
                        slot_indices=[j % 8] if state == JobState.RUNNING else [],
                        cost_minor=0 if state in ACTIVE_OR_QUEUED else rng.randint(1, 90),
                    )
                )
            Job.objects.bulk_create(jobs, batch_size=1000)
            JobAttempt.objects.bulk_create(
                JobAttempt(
                    organization=org,
                    job=job,
                    number=1,
                    worker=job.worker,
                    slot_indices=job.slot_indices,
                    scheduled_at=job.scheduled_at,
                    started_at=job.started_at,
                    ended_at=job.finished_at,
                    outcome=ATTEMPT_OUTCOME[job.state],
                )
                for job in jobs
                if job.state != JobState.QUEUED
            )
            for job in jobs:
                if job.finished_at is None or job.state == JobState.CANCELLED:
                    continue
                ledger.append(
                    UsageRecord(
                        organization=org,
                        resource="gpu:cpu",
                        quantity=Decimal((job.finished_at - job.started_at).total_seconds()),
                        unit="gpu_second",
                        period_start=job.started_at,
                        period_end=job.finished_at,
                        idempotency_key=f"job:{job.pk}:attempt:1",
                        source_type="job_attempt",
                        source_id=str(job.pk),
                        attempt=1,
                        user_id=job.created_by_id,
                        api_key_id=job.created_by_api_key_id,
                        labels=job.labels,
                        model_name=job.output_model_name,
                        created_at=job.finished_at,
                    )
                )
            month_start = now.replace(day=1, hour=0, minute=0, second=0)
            for h in range(int((now - month_start).total_seconds() // 3600)):
                start = month_start + timedelta(hours=h)
                ledger.append(
                    UsageRecord(
                        organization=org,
                        resource="storage",
                        quantity=Decimal("0.05"),
                        unit="gb_month",
                        period_start=start,
                        period_end=start + timedelta(hours=1),
                        idempotency_key=f"storage:{org.pk}:{start.isoformat()}",
                        created_at=start + timedelta(hours=1),
                    )
                )
        ledger.sort(key=lambda row: row.period_end)  # as the ledger grows: in time order
        for first in range(0, len(ledger), 1000):
            usage_record_many(rows=ledger[first : first + 1000])
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")  # as autovacuum would have by now


ACTIVE_OR_QUEUED = ("queued", "scheduled", "running", "preempted", "cancelling")
ATTEMPT_OUTCOME = {
    "running": "active",
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
}


def forget_submitted() -> None:
    """Jobs (and their audit rows) that earlier runs submitted: each run starts from the seed."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "DELETE FROM jobs_jobevent WHERE job_id IN "
            "(SELECT id FROM jobs_job WHERE idempotency_key LIKE %s)",
            [f"{SUBMIT_KEY_PREFIX}%"],
        )
        cursor.execute(
            "DELETE FROM jobs_job WHERE idempotency_key LIKE %s", [f"{SUBMIT_KEY_PREFIX}%"]
        )
        deleted = cursor.rowcount
        cursor.execute("DELETE FROM tenants_auditevent WHERE action = 'job.submit'")
        if deleted:
            cursor.execute("VACUUM ANALYZE jobs_job")
            progress(f"deleted {deleted:,} jobs that earlier runs submitted")


def client_specs() -> dict[str, list[dict]]:
    """Per endpoint, one client per seeded key (32), organizations interleaved."""
    from jobs.models import Job
    from tenants.models import Organization

    slugs = {org.pk: org.slug for org in Organization.objects.filter(slug__startswith="load-org-")}
    specs: dict[str, list[dict]] = {name: [] for name in [*BASELINES, *READS, SUBMIT]}
    for a in range(ADMINS_PER_ORG):
        for o in range(ORGS):
            key = token_for(o, a)[1]
            slug = f"load-org-{o}"
            org_id = next(pk for pk, s in slugs.items() if s == slug)
            base = f"/api/v1/orgs/{slug}"
            job_ids = list(
                Job.objects.filter(organization_id=org_id)
                .order_by("-created_at", "-pk")
                .values_list("pk", flat=True)[:50]
            )

            def spec(method: str, targets: list[str], *, key: str | None = key) -> dict:
                return {"method": method, "targets": targets, "key": key, "body": SUBMIT_BODY}

            specs["bare_open"].append(spec("GET", ["/api/v1/bench/open/"], key=None))
            specs["bare_drf"].append(spec("GET", ["/api/v1/bench/bare/"]))
            specs["bare_key"].append(spec("GET", ["/api/v1/bench/key/"]))
            specs["job_get"].append(spec("GET", [f"{base}/jobs/{pk}/" for pk in job_ids]))
            specs["job_list"].append(spec("GET", [f"{base}/jobs/"]))
            specs["usage"].append(spec("GET", [f"{base}/billing/usage/"]))
            specs[SUBMIT].append(spec("POST", [f"{base}/jobs/"]))
    return specs


# The server


@contextlib.contextmanager
def running_gunicorn(env: dict, *, workers: int, tmp: Path):
    with gunicorn(env, tmp, workers=workers, options=("--timeout=60", "--backlog=2048")) as (
        port,
        master,
    ):
        warm_up(port)
        with Server(port=port, master_pid=master) as server:
            yield server


class Server:
    """The running gunicorn, and CPU time read from /proc: its workers', and that of the
    PostgreSQL backends serving this database (CPU per request is what the shared machine's
    other load moves least)."""

    def __init__(self, *, port: int, master_pid: int) -> None:
        self.port, self.master_pid = port, master_pid
        self.database = urlsplit(DATABASE_URL).path.lstrip("/")

    def __enter__(self) -> Server:
        import psycopg

        maintenance = urlsplit(DATABASE_URL)._replace(path="/postgres").geturl()
        self.conn = psycopg.connect(maintenance, autocommit=True)
        return self

    def __exit__(self, *exc) -> None:
        self.conn.close()

    def cpu(self) -> tuple[dict[int, float], dict[int, float]]:
        """CPU seconds so far of each gunicorn worker and each of this database's backends."""
        backends = [
            row[0]
            for row in self.conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                [self.database],
            )
        ]
        workers = children_of(self.master_pid)
        return {pid: cpu_seconds(pid) for pid in workers}, {
            pid: cpu_seconds(pid) for pid in backends
        }


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU used between two samples by the processes alive at the second. A backend that ends
    in between (Django reconnects after CONN_MAX_AGE, 60 s) takes its last share with it, so this
    errs low, by a few ms of CPU at most per step."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_of(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name in brackets may hold spaces; the parent pid follows it.
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def warm_up(port: int) -> None:
    """Every worker past its first requests (imports, connections) before anything is timed;
    one failed request here stops the run with the server's answer."""
    key = token_for(0, 0)[1]
    base = "/api/v1/orgs/load-org-0"
    for _ in range(30):
        for method, target, body in (
            ("GET", "/api/v1/bench/open/", None),
            ("GET", "/api/v1/bench/bare/", None),
            ("GET", "/api/v1/bench/key/", None),
            ("GET", f"{base}/jobs/", None),
            ("GET", f"{base}/billing/usage/", None),
            ("POST", f"{base}/jobs/", SUBMIT_BODY),
        ):
            headers = {"Authorization": f"Bearer {key}", "X-Forwarded-Proto": "https"}
            if body:
                headers |= {
                    "Content-Type": "application/json",
                    "Idempotency-Key": f"{SUBMIT_KEY_PREFIX}{uuid.uuid4().hex}",
                }
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request(method, target, body=body, headers=headers)
            response = conn.getresponse()
            content = response.read()
            conn.close()
            if response.status not in (200, 201):
                raise SystemExit(f"{method} {target}: {response.status} {content[:500]!r}")


def flush_redis() -> None:
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()


# The report


def report(figures: dict, *, plan: Plan, args, loads) -> None:
    ramp, rounds, half = figures["ramp"], figures["rounds"], figures["half"]

    def median_step(name: str) -> dict:
        steps = rounds[name]
        return {
            "requests": sum(s.requests for s in steps),
            "errors": sum(s.errors for s in steps),
            "rps": statistics.median(s.rps for s in steps),
            "p50_ms": statistics.median(s.pct(50) for s in steps),
            "p95_ms": statistics.median(s.pct(95) for s in steps),
            "p99_ms": statistics.median(s.pct(99) for s in steps),
            "web_ms": statistics.median(s.per_request_ms(s.web_cpu_s) for s in steps),
            "db_ms": statistics.median(s.per_request_ms(s.db_cpu_s) for s in steps),
            "peak_rps": max(step.rps for _, step in ramp[name]),
            "peak_clients": max(ramp[name], key=lambda pair: pair[1].rps)[0],
        }

    rows = {name: median_step(name) for name in rounds}
    all_steps = [s for steps in rounds.values() for s in steps] + [
        step for pairs in ramp.values() for _, step in pairs
    ]
    cpu_per_request = sum(s.client_cpu_s for s in all_steps) / max(
        1, sum(s.requests for s in all_steps)
    )
    busiest = max(all_steps, key=lambda s: s.rps)

    print(
        f"API under load: gunicorn {args.workers} sync workers, production settings, "
        f"PostgreSQL; {plan.clients} API-key clients in {args.client_procs} processes; "
        f"{plan.rounds} round(s) of {plan.round_s:.0f} s per endpoint at {plan.clients} clients "
        f"(medians), ramp {list(plan.ramp_levels)} clients x {plan.ramp_s:.0f} s; "
        f"load average {loads[0][0]:.2f} before, {loads[1][0]:.2f} after"
    )
    print()
    header = (
        f"  {'endpoint':13}{'requests':>9}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
        f"{'errors':>8}{'peak req/s':>12}{'at':>5}{'vs bare DRF':>13}"
        f"{'web CPU ms':>12}{'db CPU ms':>11}{'CPU vs bare':>13}"
    )
    print(header)
    print("  " + "-" * (len(header) - 2))
    bare = rows["bare_drf"]["rps"]
    bare_cpu = rows["bare_drf"]["web_ms"] + rows["bare_drf"]["db_ms"]
    for name in [*READS, SUBMIT, *BASELINES]:
        row = rows[name]
        ratio = f"{row['rps'] / bare:.2f}" if name != "bare_drf" else "1.00"
        print(
            f"  {name:13}{row['requests']:>9,}{row['rps']:>9.1f}{row['p50_ms']:>9.1f}"
            f"{row['p95_ms']:>9.1f}{row['p99_ms']:>9.1f}{row['errors']:>8}"
            f"{row['peak_rps']:>12.1f}{row['peak_clients']:>5}{ratio:>13}"
            f"{row['web_ms']:>12.2f}{row['db_ms']:>11.2f}"
            f"{bare_cpu / (row['web_ms'] + row['db_ms']):>13.2f}"
        )
    print(
        "  web / db CPU ms = CPU time of the gunicorn workers / of this database's PostgreSQL "
        "backends per request (medians of the rounds); CPU vs bare = bare DRF's CPU per request "
        "/ this one's, the throughput ratio to expect where the CPUs are not shared"
    )
    print()
    print("  ramp, req/s (p99 ms) by closed-loop clients:")
    for name, pairs in ramp.items():
        cells = "  ".join(f"{lvl}: {s.rps:.0f} ({s.pct(99):.0f})" for lvl, s in pairs)
        print(f"    {name:13}{cells}")
    print("  rounds, req/s:")
    for name, steps in rounds.items():
        print(f"    {name:13}" + "  ".join(f"{s.rps:.1f}" for s in steps))
    print()
    print(
        f"  submit open loop at {half.requests / half.seconds:.1f} req/s (half of the maximum "
        f"{figures['submit_max']:.1f}) for {half.seconds:.0f} s: p50 {half.pct(50):.1f} ms, "
        f"p95 {half.pct(95):.1f} ms, p99 {half.pct(99):.1f} ms, max {max(half.latencies_ms):.1f} "
        f"ms, errors {half.errors}, starts > 5 ms late {half.late}; web CPU "
        f"{half.per_request_ms(half.web_cpu_s):.2f} ms, db CPU "
        f"{half.per_request_ms(half.db_cpu_s):.2f} ms per request"
    )
    print(
        f"  client: {cpu_per_request * 1000:.2f} ms CPU per request; at the busiest step "
        f"({busiest.endpoint}, {busiest.rps:.0f} req/s) the clients used "
        f"{busiest.client_cpu_s / (busiest.seconds + plan.warm_s + 0.3) * 100:.0f}% of one core"
    )
    met_submit = half.pct(99) < TARGET_SUBMIT_P99_MS and half.errors == 0
    print(
        f"  target submit p99 < {TARGET_SUBMIT_P99_MS:.0f} ms at half its maximum throughput: "
        f"{'met' if met_submit else 'MISSED'} ({half.pct(99):.1f} ms)"
    )
    for name in READS:
        ratio = rows[name]["rps"] / bare
        verdict = "met" if ratio >= TARGET_READ_RATIO else "MISSED"
        print(
            f"  target {name} >= {TARGET_READ_RATIO}x bare DRF throughput: {verdict} ({ratio:.2f})"
        )

    def figure(row: dict) -> dict:
        return {key: round(row[key], 1) for key in ("rps", "p50_ms", "p95_ms", "p99_ms")}

    result = {
        "endpoints": {name: figure(rows[name]) for name in [*READS, SUBMIT]},
        "baseline": {name: figure(rows[name]) for name in BASELINES},
        "submit_half_load": {
            "rate_rps": round(half.requests / half.seconds, 1),
            "max_rps": round(figures["submit_max"], 1),
            "p50_ms": round(half.pct(50), 1),
            "p95_ms": round(half.pct(95), 1),
            "p99_ms": round(half.pct(99), 1),
            "errors": half.errors,
        },
        "cpu_ms_per_request": {
            name: {"web": round(rows[name]["web_ms"], 2), "db": round(rows[name]["db_ms"], 2)}
            for name in [*READS, SUBMIT, *BASELINES]
        },
    }
    print(f"RESULT {json.dumps(result)}")


# The database


if __name__ == "__main__":
    main()
