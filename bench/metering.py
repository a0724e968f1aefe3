"""Ledger writes and the Stripe meter-event outbox, against plain inserts and plain HTTP posts.

    .venv/bin/python -m bench.metering                # 3 rounds of 2,000 rows; about a minute
    .venv/bin/python -m bench.metering --quick        # smoke check: 1 round of 200 rows

Ledger: `billing.services.usage_record_many` in batches of --ledger-batch rows (idempotency-key
check, pricing, the month's tally rows locked and updated, the ledger rows and their MeterPush
outbox rows, one transaction per batch: how storage metering writes) against plain
`bulk_create` of the same rows in the same batches (no check, no tally, no outbox). Target:
>= 2,000 rows/s. Beside it, one row per `usage_record` call (how a job attempt's end writes)
against one plain insert per row.

Push: `billing.metering.meter_push_due` draining those outbox rows in batches to the fake
Stripe server of the tests (tests/billing/stripe_server.py, real HTTP on 127.0.0.1, through the
stripe library), against the baseline of raw form posts of the same meter events to the same
server with one requests.Session and no database. The customer, meter, price and subscription
exist before the timed span.

Needs PostgreSQL on 127.0.0.1:5432 (the database `factory_saas_ha_bench`, created and migrated
if missing; BENCH_METERING_DATABASE_URL overrides it) and Redis (the test settings' cache).
Medians over rounds; the table goes to stdout, ending with one `RESULT {json}` line; progress
goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.databases import ensure_database, migrate  # noqa: E402

DATABASE_URL = os.environ.get(
    "BENCH_METERING_DATABASE_URL",
    "postgres://postgres@127.0.0.1:5432/factory_saas_ha_bench",
)
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/2")
SETTINGS_MODULE = "factory_saas.settings.test"
RESOURCE = "bench:gpu"
TARGET_ROWS_PER_S = 2000


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000, help="ledger rows per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=100, help="outbox rows per claim")
    parser.add_argument(
        "--ledger-batch", type=int, default=500, help="ledger rows per usage_record_many call"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of 200 rows")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.rounds = 200, 1

    from tests.billing.stripe_server import StripeServer

    server = StripeServer().start()
    env = {
        "DJANGO_SETTINGS_MODULE": SETTINGS_MODULE,
        "DATABASE_URL": DATABASE_URL,
        "REDIS_URL": REDIS_URL,
        "STRIPE_SECRET_KEY": server.fake.api_key,
        "STRIPE_WEBHOOK_SECRET": server.fake.webhook_secret,
        "STRIPE_API_BASE": server.url,
        "STRIPE_PUSH_BATCH": str(args.batch),
    }
    os.environ.update(env)
    progress(f"preparing {DATABASE_URL}")
    ensure_database(DATABASE_URL)
    migrate(env)
    import django

    django.setup()
    forget_stripe()
    load_before = os.getloadavg()
    try:
        rounds = [
            run_round(number, rows=args.rows, batch=args.ledger_batch, server=server)
            for number in range(args.rounds)
        ]
    finally:
        server.stop()
    report(rounds, rows=args.rows, batch=args.batch, loads=(load_before, os.getloadavg()))


def forget_stripe() -> None:
    """This run's fake Stripe knows none of an earlier run's objects: start from none."""
    from billing.models import BillingAccount, MeterPush, StripeObject

    StripeObject.objects.all().delete()
    BillingAccount.objects.update(stripe_customer_id="", stripe_subscription_id="")
    MeterPush.objects.filter(state=MeterPush.State.PENDING).update(state=MeterPush.State.SKIPPED)


def run_round(number: int, *, rows: int, batch: int, server) -> dict[str, float]:
    from django.db import connection
    from django.db.models import Sum

    from billing import metering, services, stripe_sync
    from billing.models import MeterPush, Price, UsageRecord
    from tenants.models import Organization

    Price.objects.get_or_create(
        resource=RESOURCE,
        effective_from=datetime(2020, 1, 1, tzinfo=UTC),
        defaults={"unit": "gpu_second", "unit_price": Decimal("0.0010")},
    )
    stamp = f"{int(time.time())}-{number}"
    ours_org = Organization.objects.create(name=f"Metering bench {stamp}", slug=f"mb-{stamp}")
    base_org = Organization.objects.create(name=f"Metering base {stamp}", slug=f"mbb-{stamp}")
    start = datetime.now(tz=UTC).replace(microsecond=0) - timedelta(days=1)
    periods = [
        (start + timedelta(seconds=n), start + timedelta(seconds=n + 1)) for n in range(rows)
    ]
    connection.ensure_connection()

    def ledger_rows(org, prefix: str, count: int) -> list:
        return [
            UsageRecord(
                organization=org,
                resource=RESOURCE,
                quantity=Decimal(100),
                unit="gpu_second",
                unit_price=Decimal("0.0010"),
                amount_minor=10,
                currency="usd",
                period_start=period_start,
                period_end=period_end,
                idempotency_key=f"{prefix}:{stamp}:{n}",
            )
            for n, (period_start, period_end) in enumerate(periods[:count])
        ]

    # Ledger, ours: usage_record_many in batches (idempotency check, pricing, tally, outbox).
    rows_ours = ledger_rows(ours_org, "bench", rows)
    began = time.perf_counter()
    for first in range(0, rows, batch):
        services.usage_record_many(rows=rows_ours[first : first + batch])
    ledger_s = time.perf_counter() - began

    # Ledger, baseline: the same rows as plain bulk inserts of the same batch size.
    rows_base = ledger_rows(base_org, "base", rows)
    began = time.perf_counter()
    for first in range(0, rows, batch):
        UsageRecord.objects.bulk_create(rows_base[first : first + batch])
    baseline_ledger_s = time.perf_counter() - began

    # One row per call, as a job attempt's end records it, against one plain insert per row.
    single = max(rows // 4, 1)
    row_org = Organization.objects.create(name=f"Metering rows {stamp}", slug=f"mbr-{stamp}")
    began = time.perf_counter()
    for row in ledger_rows(row_org, "row", single):
        services.usage_record(
            organization=row_org,
            resource=RESOURCE,
            quantity=row.quantity,
            unit=row.unit,
            period_start=row.period_start,
            period_end=row.period_end,
            idempotency_key=row.idempotency_key,
        )
    row_s = time.perf_counter() - began
    began = time.perf_counter()
    for row in ledger_rows(base_org, "baserow", single):
        row.save()
    baseline_row_s = time.perf_counter() - began
    # Only the batched rows are pushed below.
    MeterPush.objects.filter(usage__organization=row_org).update(state=MeterPush.State.SKIPPED)
    progress(
        f"round {number + 1}: ledger {rows / ledger_s:,.0f} rows/s in batches of {batch} "
        f"(plain bulk inserts {rows / baseline_ledger_s:,.0f}); one row per call "
        f"{single / row_s:,.0f} rows/s (plain inserts {single / baseline_row_s:,.0f})"
    )

    # Push, ours. The customer and catalog are made first, outside the timed span.
    account = services.billing_account_ensure(organization=ours_org)
    stripe_sync.subscription_item_ensure(account=account, resource=RESOURCE)
    due = MeterPush.objects.filter(usage__organization=ours_org, state=MeterPush.State.PENDING)
    pending = due.count()
    before = len(server.fake.meter_events)
    began = time.perf_counter()
    sent = 0
    while True:
        result = metering.meter_push_due()
        if not result.claimed:
            break
        if result.failed:
            raise SystemExit(f"push failed: {result.errors}")
        sent += result.sent
    push_s = time.perf_counter() - began
    received = len(server.fake.meter_events) - before
    ledger_minor = UsageRecord.objects.filter(organization=ours_org).aggregate(
        t=Sum("amount_minor")
    )
    customer_total = server.fake.meter_total(customer=account.stripe_customer_id)
    if sent != pending or received != pending or customer_total != ledger_minor["t"]:
        raise SystemExit(
            f"push lost or duplicated events: {pending} due, {sent} sent, {received} received, "
            f"{customer_total} received vs {ledger_minor['t']} in the ledger"
        )

    # Push, baseline: the same events as raw posts, no outbox.
    baseline_push_s = raw_posts(server, account.stripe_customer_id, stamp=stamp, count=pending)
    progress(
        f"round {number + 1}: push {sent / push_s:,.0f} events/s "
        f"(raw posts {pending / baseline_push_s:,.0f} events/s)"
    )
    return {
        "ledger_rows_per_s": rows / ledger_s,
        "baseline_ledger_rows_per_s": rows / baseline_ledger_s,
        "single_rows_per_s": single / row_s,
        "baseline_single_rows_per_s": single / baseline_row_s,
        "push_events_per_s": sent / push_s,
        "baseline_push_events_per_s": pending / baseline_push_s,
    }


def raw_posts(server, customer_id: str, *, stamp: str, count: int) -> float:
    import requests

    from billing import stripe_gateway

    session = requests.Session()
    headers = {"Authorization": f"Bearer {server.fake.api_key}"}
    name = stripe_gateway.event_name(RESOURCE)
    now = int(time.time()) - 3600
    began = time.perf_counter()
    for n in range(count):
        identifier = f"raw-{stamp}-{n}"
        response = session.post(
            f"{server.url}/v1/billing/meter_events",
            data={
                "event_name": name,
                "payload[stripe_customer_id]": customer_id,
                "payload[value]": "10",
                "identifier": identifier,
                "timestamp": str(now),
            },
            headers={**headers, "Idempotency-Key": identifier},
            timeout=10,
        )
        response.raise_for_status()
    return time.perf_counter() - began


def report(rounds: list[dict[str, float]], *, rows: int, batch: int, loads) -> None:
    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    ledger, base_ledger = median("ledger_rows_per_s"), median("baseline_ledger_rows_per_s")
    single, base_single = median("single_rows_per_s"), median("baseline_single_rows_per_s")
    push, base_push = median("push_events_per_s"), median("baseline_push_events_per_s")
    print(
        f"Metering: {len(rounds)} round(s) of {rows:,} ledger rows; outbox batches of {batch}; "
        f"load average {loads[0][0]:.2f} before, {loads[1][0]:.2f} after"
    )
    print()
    print(f"  {'':38}{'ours':>14}{'baseline':>14}{'ratio':>8}")
    print(
        f"  {'ledger rows/s, batched (many | bulk)':38}{ledger:>14,.0f}{base_ledger:>14,.0f}"
        f"{ledger / base_ledger:>8.2f}"
    )
    print(
        f"  {'ledger rows/s, one per call (| save)':38}{single:>14,.0f}{base_single:>14,.0f}"
        f"{single / base_single:>8.2f}"
    )
    print(
        f"  {'meter events/s (outbox | raw posts)':38}{push:>14,.0f}{base_push:>14,.0f}"
        f"{push / base_push:>8.2f}"
    )
    print()
    print("  per round (batched, baseline, one per call, baseline, push, baseline):")
    for number, r in enumerate(rounds, 1):
        print(
            f"    {number}: {r['ledger_rows_per_s']:,.0f}  {r['baseline_ledger_rows_per_s']:,.0f}  "
            f"{r['single_rows_per_s']:,.0f}  {r['baseline_single_rows_per_s']:,.0f}  "
            f"{r['push_events_per_s']:,.0f}  {r['baseline_push_events_per_s']:,.0f}"
        )
    met = "met" if ledger >= TARGET_ROWS_PER_S else "missed"
    print(f"  target ledger >= {TARGET_ROWS_PER_S:,} rows/s: {met}")
    result = {
        "ledger_rows_per_s": round(ledger),
        "push_events_per_s": round(push),
        "baseline_ledger_rows_per_s": round(base_ledger),
        "single_rows_per_s": round(single),
        "baseline_single_rows_per_s": round(base_single),
        "baseline_push_events_per_s": round(base_push),
    }
    print(f"RESULT {json.dumps(result)}")


if __name__ == "__main__":
    main()
