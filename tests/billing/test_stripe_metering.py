"""The meter-event outbox against the fake Stripe server: nothing lost, nothing counted twice."""

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.db.models import Sum
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from billing import metering, selectors, services, stripe_gateway, stripe_sync, tasks
from billing.models import (
    BillingAccount,
    CreditGrant,
    MeterPush,
    Reconciliation,
    StripeObject,
    UsageRecord,
)
from tests.factories import OrganizationFactory, PriceFactory

DAY = date(2026, 11, 20)
GPU = "gpu:test-a100"
PREDICTIONS = "test-predictions"
pytestmark = pytest.mark.django_db


@pytest.fixture
def prices(db):
    return [
        PriceFactory(resource=GPU, unit_price=Decimal("0.0010")),
        PriceFactory(resource=PREDICTIONS, unit="prediction", unit_price=Decimal("0.0100")),
    ]


def record(organization, count, *, resource=GPU, quantity=100, day=DAY, key="u"):
    """`count` ledger rows, one a minute from 10:00 UTC of `day`; 10 cents each at GPU rates."""
    start = datetime(day.year, day.month, day.day, 10, tzinfo=UTC)
    rows = []
    for n in range(count):
        row, _ = services.usage_record(
            organization=organization,
            resource=resource,
            quantity=Decimal(quantity),
            unit="unit",
            period_start=start + timedelta(minutes=n),
            period_end=start + timedelta(minutes=n, seconds=59),
            idempotency_key=f"{key}:{organization.pk}:{resource}:{n}",
        )
        rows.append(row)
    return rows


def drain(*, rounds=5000, limit=50):
    """Push until the outbox is empty; when nothing is due, time 'passes' (rows become due)."""
    for _ in range(rounds):
        result = metering.meter_push_due(limit=limit)
        if result.claimed:
            continue
        pending = MeterPush.objects.filter(state=MeterPush.State.PENDING)
        if not pending.exists():
            return
        pending.update(next_attempt_at=timezone.now())
    raise AssertionError(f"outbox not drained after {rounds} rounds")


def ledger_total():
    return UsageRecord.objects.aggregate(total=Sum("amount_minor"))["total"] or 0


def assert_stripe_matches_ledger(fake):
    sent = MeterPush.objects.filter(state=MeterPush.State.SENT)
    assert not MeterPush.objects.filter(state=MeterPush.State.PENDING).exists()
    identifiers = [event["identifier"] for event in fake.meter_events]
    assert len(identifiers) == len(set(identifiers))
    assert sorted(identifiers) == sorted(f"usage-{pk}" for pk in sent.values_list("pk", flat=True))
    assert fake.meter_total() == ledger_total()


def test_usage_enters_the_outbox_and_is_sent_once_with_the_ledger_amount(fake_stripe, prices):
    org = OrganizationFactory()
    rows = record(org, 3)
    record(org, 2, resource=PREDICTIONS, quantity=3)

    result = metering.meter_push_due(limit=100)
    assert (result.claimed, result.sent, result.failed) == (5, 5, 0)
    assert metering.meter_push_due(limit=100).claimed == 0

    account = BillingAccount.objects.get(organization=org)
    assert account.stripe_customer_id in fake_stripe.objects["customer"]
    assert account.stripe_subscription_id in fake_stripe.objects["subscription"]
    customer = fake_stripe.objects["customer"][account.stripe_customer_id]
    assert customer["metadata"] == {"organization_id": str(org.pk), "organization_slug": org.slug}
    event = next(e for e in fake_stripe.meter_events if e["identifier"] == f"usage-{rows[0].pk}")
    assert event["event_name"] == stripe_gateway.event_name(GPU)
    assert event["payload"] == {"stripe_customer_id": account.stripe_customer_id, "value": "10"}
    assert event["timestamp"] == int(rows[0].period_end.timestamp())
    assert_stripe_matches_ledger(fake_stripe)


def test_catalog_has_a_meter_product_and_one_cent_metered_price_per_resource(fake_stripe, prices):
    services.billing_account_ensure(organization=OrganizationFactory())
    stripe_sync.catalog_ensure()
    stripe_sync.catalog_ensure()  # the second time finds everything

    resources = selectors.billable_resources()
    assert {GPU, PREDICTIONS} <= set(resources)
    assert len(fake_stripe.objects["meter"]) == len(resources)
    usage_products = [
        p for p in fake_stripe.objects["product"].values() if "resource" in p["metadata"]
    ]
    assert len(usage_products) == len(resources)
    for resource in (GPU, PREDICTIONS):
        price_id = StripeObject.objects.get(kind="price", key=resource).stripe_id
        price = fake_stripe.objects["price"][price_id]
        meter = fake_stripe.objects["meter"][price["recurring"]["meter"]]
        assert price["unit_amount"] == 1
        assert price["recurring"]["usage_type"] == "metered"
        assert meter["event_name"] == stripe_gateway.event_name(resource)
        assert meter["default_aggregation"] == {"formula": "sum"}
        assert meter["value_settings"] == {"event_payload_key": "value"}


def test_a_monthly_fee_becomes_a_flat_price_on_the_subscription(fake_stripe, prices):
    org = OrganizationFactory()
    account = services.billing_account_ensure(organization=org)
    account.plan.monthly_fee_minor = 4900
    account.plan.save()

    stripe_sync.subscription_ensure(account=account)

    subscription = fake_stripe.objects["subscription"][account.stripe_subscription_id]
    amounts = sorted(item["price"]["unit_amount"] for item in subscription["items"]["data"])
    assert amounts == [1] * len(selectors.billable_resources()) + [4900]


def test_a_resource_priced_after_the_subscription_is_added_to_it(fake_stripe, prices):
    orgs = [OrganizationFactory(), OrganizationFactory()]
    for org in orgs:
        record(org, 1)
    drain()
    PriceFactory(resource="test-storage", unit="gb_month", unit_price=Decimal("0.5"))
    for org in orgs:  # both in one batch
        record(org, 1, resource="test-storage", quantity=1)
    drain()

    storage_price = StripeObject.objects.get(kind="price", key="test-storage").stripe_id
    for org in orgs:
        account = BillingAccount.objects.get(organization=org)
        subscription = fake_stripe.objects["subscription"][account.stripe_subscription_id]
        assert storage_price in {item["price"]["id"] for item in subscription["items"]["data"]}
    assert_stripe_matches_ledger(fake_stripe)


def test_a_failed_push_backs_off_and_records_the_error(fake_stripe, prices, settings):
    settings.STRIPE_PUSH_BACKOFF_S = 60  # the fixture's 10 ms can pass before the next line
    org = OrganizationFactory()
    record(org, 1)
    fake_stripe.fail_next(1)

    result = metering.meter_push_due(limit=10)

    assert (result.sent, result.failed, result.transient_failure) == (0, 1, True)
    push = MeterPush.objects.get()
    assert push.attempts == 1
    assert push.next_attempt_at > timezone.now()
    assert "APIError" in push.last_error
    assert metering.meter_push_due(limit=10).claimed == 0  # not due yet


@pytest.mark.parametrize("fault", ["fail", "stall-before", "stall-after"])
def test_stripe_failing_on_many_pushes_in_a_row_loses_and_duplicates_nothing(
    fake_stripe, prices, settings, fault
):
    """1,000 failures (or 40 stalls past the client timeout) in a row, then recovery."""
    orgs = [OrganizationFactory() for _ in range(3)]
    for number, org in enumerate(orgs):
        record(org, 40, key="a")
        record(org, 10 + number, resource=PREDICTIONS, quantity=7, key="b")
    if fault == "fail":
        fake_stripe.fail_next(1000)
        limit = 10
    else:
        limit = 50
        settings.STRIPE_TIMEOUT_S = 0.1
        fake_stripe.stall_next(40, seconds=0.5, after_processing=fault == "stall-after")

    drain(limit=limit)

    assert fake_stripe.faults_left() == 0
    assert_stripe_matches_ledger(fake_stripe)
    for org in orgs:
        account = BillingAccount.objects.get(organization=org)
        ours = UsageRecord.objects.filter(organization=org).aggregate(t=Sum("amount_minor"))["t"]
        assert fake_stripe.meter_total(customer=account.stripe_customer_id) == ours
    assert len(fake_stripe.objects["customer"]) == 3
    assert len(fake_stripe.objects["subscription"]) == 3


def test_an_event_stripe_already_holds_counts_as_sent(fake_stripe, prices):
    org = OrganizationFactory()
    [row] = record(org, 1)
    drain()
    # The answer was lost and the idempotency key forgotten: the resend meets the identifier.
    MeterPush.objects.filter(pk=row.pk).update(
        state=MeterPush.State.PENDING, next_attempt_at=timezone.now()
    )
    fake_stripe.idempotent.clear()

    result = metering.meter_push_due(limit=10)

    assert (result.sent, result.failed) == (1, 0)
    assert len(fake_stripe.meter_events) == 1
    assert MeterPush.objects.get().state == MeterPush.State.SENT


def test_zero_amount_rows_are_skipped_and_never_sent(fake_stripe, prices):
    org = OrganizationFactory()
    record(org, 1, quantity=0)
    assert MeterPush.objects.get().state == MeterPush.State.SKIPPED
    drain()
    assert fake_stripe.meter_events == []


def test_rows_retried_often_or_long_overdue_are_reported_stuck(fake_stripe, prices):
    org = OrganizationFactory()
    first, second, _third = record(org, 3)
    now = timezone.now()
    MeterPush.objects.filter(pk=first.pk).update(attempts=5, next_attempt_at=now + timedelta(1))
    MeterPush.objects.filter(pk=second.pk).update(next_attempt_at=now - timedelta(hours=2))

    stuck = {push.pk for push in selectors.meter_push_stuck(now=now)}

    assert stuck == {first.pk, second.pk}


def test_reconciliation_reports_a_planted_difference(fake_stripe, prices):
    org, other = OrganizationFactory(), OrganizationFactory()
    record(org, 5)
    record(org, 3, resource=PREDICTIONS, quantity=2)
    record(other, 4)
    record(org, 2, day=DAY + timedelta(days=1), key="next")  # another day: not counted
    drain()
    account = BillingAccount.objects.get(organization=org)
    lost = next(
        e
        for e in fake_stripe.meter_events
        if e["payload"]["stripe_customer_id"] == account.stripe_customer_id
        and e["event_name"] == stripe_gateway.event_name(GPU)
    )
    fake_stripe.meter_events.remove(lost)  # Stripe lost one event

    rows = metering.reconcile_day(day=DAY)

    found = {(r.organization_id, r.resource): (r.ledger_minor, r.stripe_minor) for r in rows}
    assert found == {
        (org.pk, GPU): (50, 40),
        (org.pk, PREDICTIONS): (6, 6),
        (other.pk, GPU): (40, 40),
    }
    assert [
        (r.organization_id, r.difference_minor) for r in selectors.reconciliation_differences()
    ] == [(org.pk, 10)]
    metering.reconcile_day(day=DAY)  # a rerun updates the same rows
    assert Reconciliation.objects.count() == 3


def test_tasks_do_nothing_without_stripe(no_stripe, prices):
    record(OrganizationFactory(), 2)
    assert not MeterPush.objects.exists()  # the ledger does not fill the outbox
    assert tasks.meter_push() == 0
    assert tasks.reconcile() == 0


def test_push_task_drains_the_outbox_and_pushes_credits(fake_stripe, prices):
    org = OrganizationFactory()
    record(org, 3)
    grant, _ = services.credit_grant(organization=org, amount_minor=500, reason="welcome")
    grants = CreditGrant.objects.filter(organization=org)  # the plan's trial credit too

    assert tasks.meter_push() == 3
    grant.refresh_from_db()
    account = BillingAccount.objects.get(organization=org)
    pushed = fake_stripe.objects["balance_transaction"]
    assert pushed[grant.stripe_transaction_id]["amount"] == -500
    balance = fake_stripe.objects["customer"][account.stripe_customer_id]["balance"]
    assert balance == -sum(grants.values_list("amount_minor", flat=True))
    tasks.meter_push()  # idempotent: no second credit
    assert len(pushed) == grants.count()


def test_gateway_refuses_to_call_stripe_inside_a_transaction(fake_stripe, prices):
    from django.db import transaction

    account = services.billing_account_ensure(organization=OrganizationFactory())
    with pytest.raises(RuntimeError, match="transaction"), transaction.atomic():
        stripe_sync.customer_ensure(account=account)
    assert fake_stripe.objects["customer"] == {}


def test_reconciliation_reads_the_ledger_in_one_query_for_all_customers(fake_stripe, prices):
    orgs = [OrganizationFactory() for _ in range(4)]
    for number, org in enumerate(orgs):
        record(org, number + 1)
    drain()

    with CaptureQueriesContext(connection) as queries:
        rows = metering.reconcile_day(day=DAY)

    ledger_reads = [q for q in queries.captured_queries if 'FROM "billing_usagerecord"' in q["sql"]]
    assert len(ledger_reads) == 1
    found = {r.organization_id: (r.ledger_minor, r.stripe_minor) for r in rows if r.resource == GPU}
    assert found == {org.pk: (10 * (n + 1),) * 2 for n, org in enumerate(orgs)}
