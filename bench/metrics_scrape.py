"""What one scrape of the control plane's /metrics costs the database, on a busy pool.

The world is bench/tick.py's (seeded): 250 machines of 8 GPUs in three classes, about 70% busy,
500 tenants, 10,000 queued jobs; plus pending outbox messages and meter events. A scrape reads
the pool, queues and outboxes with five grouped queries (factory_saas/pool_metrics.py). The
baseline, in the same run, is the read every scheduler tick already makes of the same pool
(`jobs.scheduler.snapshot.snapshot_load`, every SCHEDULER_TICK_S): a scrape every 15 to 30 s
should cost a small part of it.

Target: scrape p99 under 100 ms, and under the snapshot's median.

    .venv/bin/python -m bench.metrics_scrape [--runs 30] [--seed 7]

Needs PostgreSQL on 127.0.0.1:5432 (creates `factory_saas_metricsbench` afresh;
BENCH_METRICS_DATABASE_URL overrides it). Prints a table and ends with one `RESULT {json}` line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.databases import drop_database, ensure_database, migrate  # noqa: E402
from bench.tick import _pct, progress, write_world  # noqa: E402

DATABASE_URL = os.environ.get(
    "BENCH_METRICS_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/factory_saas_metricsbench"
)
TARGET_SCRAPE_P99_MS = 100.0
OUTBOX_MESSAGES = 2_000


def _timed(function) -> tuple[float, int]:
    from django.db import connection

    start_queries = len(connection.queries)
    started = time.perf_counter()
    function()
    return (time.perf_counter() - started) * 1000, len(connection.queries) - start_queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    env = {"DJANGO_SETTINGS_MODULE": "factory_saas.settings.test", "DATABASE_URL": DATABASE_URL}
    progress(f"recreating {DATABASE_URL}")
    drop_database(DATABASE_URL)
    ensure_database(DATABASE_URL)
    migrate(env)
    os.environ.update(env)
    import django

    django.setup()
    from django.db import connection, transaction
    from django.utils import timezone

    from factory_saas.metrics import exposition
    from factory_saas.pool_metrics import PoolCollector
    from jobs.scheduler.snapshot import snapshot_load
    from outbox.models import Message

    world = write_world(args.seed)
    Message.objects.bulk_create(
        Message(handler=f"bench.handler_{i % 7}", payload={}) for i in range(OUTBOX_MESSAGES)
    )
    connection.force_debug_cursor = True  # count queries

    def scrape():
        exposition([PoolCollector()])

    def snapshot():
        with transaction.atomic():
            snapshot_load(now=timezone.now())

    scrape()
    snapshot()  # warm both
    scrapes = [_timed(scrape) for _ in range(args.runs)]
    snapshots = [_timed(snapshot) for _ in range(args.runs)]
    report(world, scrapes, snapshots, runs=args.runs)
    connection.close()
    drop_database(DATABASE_URL)


def report(world: dict, scrapes: list, snapshots: list, *, runs: int) -> None:
    med = statistics.median
    print(
        f"Control-plane scrape on PostgreSQL: {world['gpus']:,} GPUs on {world['machines']} "
        f"machines, {world['running']:,} running jobs, {world['tenants']} tenants, "
        f"{world['queued']:,} queued jobs, {OUTBOX_MESSAGES:,} pending outbox messages; {runs} "
        f"runs each; load average {os.getloadavg()[0]:.2f}"
    )
    print()
    print(f"   {'read':34}{'p50 ms':>9}{'p99 ms':>9}{'queries':>9}")
    rows = {
        "scrape (/metrics, pool collector)": scrapes,
        "baseline: tick's snapshot_load": snapshots,
    }
    for name, series in rows.items():
        ms = [m for m, _q in series]
        print(f"   {name:34}{med(ms):9.1f}{_pct(ms, 99):9.1f}{series[0][1]:9d}")
    scrape_ms = [m for m, _q in scrapes]
    snapshot_p50 = med(m for m, _q in snapshots)
    p99 = _pct(scrape_ms, 99)
    met = p99 < TARGET_SCRAPE_P99_MS and med(scrape_ms) < snapshot_p50
    print(
        f"   scrape / snapshot (p50): {med(scrape_ms) / snapshot_p50:.2f}; target: scrape p99 < "
        f"{TARGET_SCRAPE_P99_MS:g} ms and below the snapshot's p50: {'met' if met else 'MISSED'}"
    )
    result = {
        "scrape_p50_ms": round(med(scrape_ms), 1),
        "scrape_p99_ms": round(p99, 1),
        "scrape_queries": scrapes[0][1],
        "snapshot_p50_ms": round(snapshot_p50, 1),
        "snapshot_queries": snapshots[0][1],
    }
    print(f"RESULT {json.dumps(result)}")


if __name__ == "__main__":
    main()
