"""The ledger: exact month totals in whole cents, exactly once per key, impossible rows refused."""

import threading
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

import pytest
from django.db import IntegrityError, connection, transaction
from django.db.models import Sum

from billing import services
from billing.models import MeterPush, UsageRecord, UsageTally
from billing.selectors import month_spend
from billing.services import storage_meter, usage_record, usage_record_many
from registry.models import StorageAccount
from tests.factories import OrganizationFactory
from tests.processes import wait_for

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


def _backend_waits_on_a_lock(pid: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_locks WHERE pid = %s AND NOT granted", [pid])
        return cursor.fetchone() is not None


@pytest.mark.django_db(transaction=True)
def test_a_writer_that_loses_the_race_for_a_key_retries_and_returns_the_winners_row(monkeypatch):
    """The race forced, not hoped for: the loser checks for the key while the winner's row is
    written but not committed, blocks on the winner's locks, and meets the unique key on its
    insert; only its retry turns that into the winner's row."""
    org = OrganizationFactory()
    inserts: dict[str, int] = {}
    real_insert = services._usage_insert

    def counted_insert(rows):
        name = threading.current_thread().name
        inserts[name] = inserts.get(name, 0) + 1
        return real_insert(rows)

    monkeypatch.setattr(services, "_usage_insert", counted_insert)
    loser: dict = {}

    def lose():
        try:
            loser["pid"] = connection.cursor().connection.info.backend_pid
            loser["result"] = _predict(org, 20_000, key="race")
        except Exception as error:
            loser["error"] = error
        finally:
            connection.close()

    thread = threading.Thread(target=lose, name="loser")
    with transaction.atomic():
        winner, created = _predict(org, 20_000, key="race")
        assert created
        thread.start()
        wait_for(lambda: "pid" in loser, timeout=10, what="the losing writer to connect")
        wait_for(
            lambda: "error" in loser or _backend_waits_on_a_lock(loser["pid"]),
            timeout=10,
            what="the losing writer to pass its check and wait on the winner's locks",
        )
    thread.join(timeout=30)

    assert "error" not in loser, loser.get("error")
    row, created = loser["result"]
    assert (row.pk, created) == (winner.pk, False)
    assert inserts["loser"] == 2  # the first try met the winner's key, the retry found its row
    assert UsageRecord.objects.filter(idempotency_key="race").count() == 1
    assert UsageTally.objects.get(organization=org).billed_minor == winner.amount_minor > 0


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
