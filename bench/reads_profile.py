"""The API reads in one process: CPU per request and queries of bench/load.py's endpoints.

    .venv/bin/python -m bench.reads_profile [--rounds 3] [--n 200] [--profile job_list]
    .venv/bin/python -m bench.reads_profile --submit [--profile job_submit]

Runs against bench/load.py's seeded database (BENCH_LOAD_DATABASE_URL) with its settings
(production plus the baseline routes) through Django's test client: no server, no clients, so
the figure is the view's own CPU (authentication, queries, serialization, rendering). Prints,
per endpoint, the medians over rounds of CPU ms per request (this process's, and its PostgreSQL
backend's, read from /proc like bench/load.py's) and the queries one request makes;
`--profile NAME` prints that endpoint's cProfile instead. `--submit` measures job submit (POST
jobs/ with bench/load.py's body and a new Idempotency-Key each) beside bare DRF instead of the
reads; the jobs it submits are deleted at the end, as bench/load.py deletes its own.
"""

import argparse
import cProfile
import os
import pstats
import statistics
import time
import uuid

from bench.load import (
    DATABASE_URL,
    REDIS_URL,
    SETTINGS_MODULE,
    SUBMIT_BODY,
    SUBMIT_KEY_PREFIX,
    cpu_seconds,
    forget_submitted,
    token_for,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=200, help="requests per endpoint per round")
    parser.add_argument("--profile", help="an endpoint to run under cProfile (CPU time)")
    parser.add_argument("--sort", default="cumulative", help="cProfile's sort key")
    parser.add_argument("--lines", type=int, default=45, help="cProfile's lines shown")
    parser.add_argument("--submit", action="store_true", help="job submit instead of the reads")
    parser.add_argument("--sql", action="store_true", help="print each endpoint's statements")
    args = parser.parse_args()
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": SETTINGS_MODULE,
            "SECRET_KEY": "load-bench-" + "x" * 40,
            "DATABASE_URL": DATABASE_URL,
            "REDIS_URL": REDIS_URL,
            "ALLOWED_HOSTS": "127.0.0.1,testserver",
            "CONN_MAX_AGE": "60",
            "STRIPE_SECRET_KEY": "",
        }
    )
    import django

    django.setup()
    from django.test import Client

    from jobs.models import Job, JobState
    from tenants.models import Organization

    forget_submitted()  # the seed's jobs as bench/load.py reads them, not its last run's submits
    org = Organization.objects.get(slug="load-org-0")
    base = f"/api/v1/orgs/{org.slug}"
    jobs = Job.objects.filter(organization=org)
    finished = jobs.filter(state=JobState.SUCCEEDED).order_by("-created_at").first()
    running = jobs.filter(state=JobState.RUNNING).order_by("-created_at").first()
    urls = {"bare_drf": "/api/v1/bench/bare/", "bare_key": "/api/v1/bench/key/"}
    if args.submit:
        urls["job_submit"] = f"{base}/jobs/"
    else:
        urls |= {
            "job_get_finished": f"{base}/jobs/{finished.pk}/",
            "job_get_running": f"{base}/jobs/{running.pk}/",
            "job_list": f"{base}/jobs/",
            "usage": f"{base}/billing/usage/",
        }
    client = Client(
        HTTP_AUTHORIZATION=f"Bearer {token_for(0, 0)[1]}",
        HTTP_X_FORWARDED_PROTO="https",
        HTTP_HOST="127.0.0.1",
    )

    def get(url: str) -> None:
        if url == urls.get("job_submit"):
            response = client.post(
                url,
                SUBMIT_BODY,
                content_type="application/json",
                HTTP_IDEMPOTENCY_KEY=f"{SUBMIT_KEY_PREFIX}{uuid.uuid4().hex}",
            )
            expected = 201
        else:
            response = client.get(url)
            expected = 200
        assert response.status_code == expected, (url, response.status_code, response.content[:300])

    try:
        measure(args, urls, get)
    finally:
        if args.submit:
            forget_submitted()


def measure(args, urls: dict[str, str], get) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    for url in urls.values():
        for _ in range(20):
            get(url)
    if args.profile:
        profile = cProfile.Profile(time.process_time)
        profile.enable()
        for _ in range(args.n):
            get(urls[args.profile])
        profile.disable()
        pstats.Stats(profile).sort_stats(args.sort).print_stats(args.lines)
        return
    queries = {}
    for name, url in urls.items():
        with CaptureQueriesContext(connection) as captured:
            get(url)
        queries[name] = len(captured)
        if args.sql:
            print(f"{name}:")
            for query in captured:
                print(f"  {query['sql']}")
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        [backend] = cursor.fetchone()
    cpu: dict[str, list[float]] = {name: [] for name in urls}
    db: dict[str, list[float]] = {name: [] for name in urls}
    for _ in range(args.rounds):
        for name, url in urls.items():
            began, db_began = time.process_time(), cpu_seconds(backend)
            for _ in range(args.n):
                get(url)
            cpu[name].append((time.process_time() - began) * 1000 / args.n)
            db[name].append((cpu_seconds(backend) - db_began) * 1000 / args.n)
    print(f"load average {os.getloadavg()[0]:.2f}")
    bare = statistics.median(cpu["bare_drf"]) + statistics.median(db["bare_drf"])
    for name in urls:
        ms, db_ms = statistics.median(cpu[name]), statistics.median(db[name])
        print(
            f"{name:18} web {ms:6.2f} ms  db {db_ms:5.2f} ms  {queries[name]} queries  "
            f"CPU vs bare {bare / (ms + db_ms):.2f}"
        )


if __name__ == "__main__":
    main()
