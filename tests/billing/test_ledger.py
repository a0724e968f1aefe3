"""The ledger: exact month totals in whole cents, exactly once per key, impossible rows refused."""

import threading
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

import pytest
from django.db import IntegrityError, connection, transaction
from django.db.models import Sum

from billing.models import MeterPush, UsageRecord, UsageTally
from billing.selectors import month_spend
from billing.services import storage_meter, usage_record, usage_record_many
from registry.models import StorageAccount
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db

NOV = datetime(2026, 11, 3, 12, tzinfo=UTC)


def _predict(org, n, at=NOV, key=None):
    return usage_record(
        organization=org,
        resource="predictions",
        quantity=Decimal(n) / 1000,
        unit="1k_predictions",
        period_start=at,
        period_end=at,
        idempotency_key=key or f"p:{org.pk}:{at.isoformat()}:{n}:{UsageRecord.objects.count()}",
    )


def test_sub_cent_usage_adds_up_instead_of_rounding_to_nothing(org):
    # One prediction costs $0.00005: alone it rounds to 0 cents, 1,000 of them are 5 cents.
    amounts = [_predict(org, 1)[0].amount_minor for _ in range(1000)]
    assert sum(amounts) == 5
    assert set(amounts) <= {0, 1}
    assert month_spend(organization=org, at=NOV) == 5


def test_a_month_of_rows_sums_to_its_exact_cost_rounded_once(org):
    quantities = [Decimal("0.333"), Decimal("0.017"), Decimal("1.499"), Decimal("0.001")] * 25
    for i, quantity in enumerate(quantities):
        _predict(org, int(quantity * 1000), at=NOV + timedelta(minutes=i))
    exact = sum(quantities) * Decimal("0.05") * 100
    billed = UsageRecord.objects.for_organization(org).aggregate(s=Sum("amount_minor"))["s"]
    assert billed == int(exact.quantize(Decimal(1), ROUND_HALF_UP))
    tally = UsageTally.objects.get(organization=org, resource="predictions")
    assert tally.billed_minor == billed and tally.exact_minor == exact


def test_each_month_and_organization_has_its_own_tally(org, other_org):
    _predict(org, 100_000, at=NOV)
    _predict(org, 100_000, at=datetime(2026, 12, 1, tzinfo=UTC))
    _predict(other_org, 100_000, at=NOV)
    assert month_spend(organization=org, at=NOV) == 500
    assert month_spend(organization=org, at=datetime(2026, 12, 5, tzinfo=UTC)) == 500
    assert UsageTally.objects.count() == 3


def test_the_same_key_records_once_and_returns_the_first_row(org):
    first, created = _predict(org, 5000, key="same")
    again, created_again = _predict(org, 7000, key="same")
    assert created and not created_again and again.pk == first.pk
    assert UsageRecord.objects.count() == 1
    assert UsageTally.objects.get().billed_minor == first.amount_minor == 25


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_concurrent_writers_of_one_key_record_one_row():
    org = OrganizationFactory()
    barrier = threading.Barrier(6)
    results = []

    def write():
        try:
            barrier.wait()
            results.append(_predict(org, 20_000, key="race")[1])
        finally:
            connection.close()

    threads = [threading.Thread(target=write) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 5 + [True]
    assert UsageRecord.objects.filter(idempotency_key="race").count() == 1
    assert UsageTally.objects.get(organization=org).billed_minor == 100


@pytest.mark.parametrize(
    ("field", "value"),
    [("quantity", Decimal(-1)), ("quantity", Decimal(10**13)), ("amount_minor", -5)],
)
def test_negative_or_absurd_rows_are_refused_by_the_database(org, field, value):
    row = {
        "organization": org,
        "resource": "predictions",
        "quantity": Decimal(1),
        "unit": "1k_predictions",
        "unit_price": Decimal("0.05"),
        "amount_minor": 5,
        "currency": "usd",
        "period_start": NOV,
        "period_end": NOV,
        "idempotency_key": "bad",
    }
    with pytest.raises(IntegrityError), transaction.atomic():
        UsageRecord.objects.create(**(row | {field: value}))


def test_negative_quantities_through_the_service_leave_nothing(org):
    with pytest.raises(IntegrityError):
        _predict(org, -1000, key="negative")
    assert not UsageRecord.objects.exists()
    assert UsageTally.objects.filter(billed_minor__gt=0).count() == 0


def test_rows_enter_the_stripe_outbox_only_with_stripe_configured(org, settings):
    settings.STRIPE_SECRET_KEY = ""
    _predict(org, 1000)
    assert not MeterPush.objects.exists()
    settings.STRIPE_SECRET_KEY = "sk_test_x"
    billed, _ = _predict(org, 100_000)
    free, _ = _predict(org, 1)  # rounds to nothing yet: nothing to send
    assert MeterPush.objects.get(usage=billed).state == MeterPush.State.PENDING
    assert MeterPush.objects.get(usage=free).state == MeterPush.State.SKIPPED


def test_storage_is_metered_hourly_in_gb_months_once_per_hour(org, other_org):
    StorageAccount.objects.create(organization=org, quota_bytes=10**12, used_bytes=730 * 10**9)
    StorageAccount.objects.create(organization=other_org, quota_bytes=10**12, used_bytes=0)
    hour = datetime(2026, 11, 3, 7, 42, tzinfo=UTC)
    assert storage_meter(hour=hour) == 1
    assert storage_meter(hour=hour) == 0  # a repeated or late run records nothing twice
    row = UsageRecord.objects.get()
    # 730 GB for one of a month's 730 hours is one GB-month: $0.023 -> 2 cents.
    assert (row.resource, row.quantity, row.unit) == ("storage", Decimal(1), "gb_month")
    assert row.amount_minor == 2 and row.organization == org
    assert row.period_start == hour.replace(minute=0) and row.period_end - row.period_start == (
        timedelta(hours=1)
    )


def test_a_batch_records_each_key_once_and_prices_every_row(org, other_org):
    stored, _ = _predict(org, 1000, key="old")

    def row(organization, key, n):
        return UsageRecord(
            organization=organization,
            resource="predictions",
            quantity=Decimal(n) / 1000,
            unit="1k_predictions",
            period_start=NOV,
            period_end=NOV,
            idempotency_key=key,
        )

    rows = [row(org, "old", 5000), row(org, "a", 2000), row(other_org, "b", 4000), row(org, "a", 9)]
    results = usage_record_many(rows=rows)
    assert [created for _, created in results] == [False, True, True, False]
    assert results[0][0].pk == stored.pk and results[3][0].pk == results[1][0].pk
    assert [r.amount_minor for r, _ in results] == [5, 10, 20, 10]
    assert UsageRecord.objects.count() == 3
    assert month_spend(organization=org, at=NOV) == 15
    assert month_spend(organization=other_org, at=NOV) == 20
    assert usage_record_many(rows=[row(org, "a", 2000)])[0][1] is False
