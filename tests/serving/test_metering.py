"""Prediction charges: one row per answered request, priced into the ledger by the roll-up, each
exactly once, per deployment, version, caller and month."""

import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.utils import timezone

from billing.models import UsageRecord
from serving import metering
from serving.metering import prediction_charge, prediction_charges_expire, predictions_bill
from serving.models import PredictionCharge
from tenants.actors import Actor
from tests.factories import ModelVersionFactory


@pytest.fixture
def charge(org, owner, make_deployment):
    deployment, (version,) = make_deployment(org)

    def make(count=1, *, version=version, actor=None, at=None, **kwargs):
        prediction_charge(
            deployment=deployment,
            version=version,
            count=count,
            inputs=[{"x": 1}] * count,
            actor=actor or Actor(user=owner),
            **kwargs,
        )
        row = PredictionCharge.objects.order_by("-pk").first()
        if at is not None:
            PredictionCharge.objects.filter(pk=row.pk).update(created_at=at)
        return row

    make.deployment, make.version = deployment, version
    return make


def _ledger(org):
    return list(UsageRecord.objects.filter(organization=org, resource="predictions").order_by("pk"))


@pytest.mark.django_db
def test_charges_roll_up_into_one_ledger_row_per_version_and_caller(
    org, owner, charge, member_factory
):
    other_version = ModelVersionFactory(organization=org, recipe_name="tabular-classifier")
    colleague = member_factory(org, "developer")
    for _ in range(3):
        charge(2)
    charge(5, version=other_version)
    charge(7, actor=Actor(user=colleague))
    assert predictions_bill() == 5
    rows = {(r.user_id, r.labels["model_version"]): r for r in _ledger(org)}
    assert len(rows) == 3
    assert rows[(owner.pk, str(charge.version.pk))].quantity == Decimal("0.006")
    assert rows[(owner.pk, str(charge.version.pk))].labels["requests"] == "3"
    assert rows[(owner.pk, str(other_version.pk))].quantity == Decimal("0.005")
    assert rows[(colleague.pk, str(charge.version.pk))].quantity == Decimal("0.007")
    assert {r.source_type for r in rows.values()} == {"deployment"}
    assert {r.source_id for r in rows.values()} == {str(charge.deployment.pk)}
    assert not PredictionCharge.objects.filter(usage=None).exists()
    # A second run finds nothing to bill; new charges make new rows.
    assert predictions_bill() == 0
    charge(1)
    assert predictions_bill() == 1
    assert sum(r.quantity for r in _ledger(org)) == Decimal("0.019")


@pytest.mark.django_db
def test_a_month_boundary_splits_the_roll_up(org, charge):
    charge(1, at=datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC))
    charge(2, at=datetime(2026, 12, 1, 0, 0, 1, tzinfo=UTC))
    predictions_bill()
    by_month = {(r.period_end.year, r.period_end.month): r.quantity for r in _ledger(org)}
    assert by_month == {(2026, 11): Decimal("0.001"), (2026, 12): Decimal("0.002")}


@pytest.mark.django_db
def test_a_failed_roll_up_bills_nothing_and_the_next_one_bills_everything(org, charge, monkeypatch):
    for _ in range(4):
        charge(1)

    def broken(*, rows):
        raise RuntimeError("the ledger is down")

    monkeypatch.setattr(metering, "usage_record_many", broken)
    with pytest.raises(RuntimeError):
        predictions_bill()
    assert PredictionCharge.objects.filter(usage=None).count() == 4
    assert not _ledger(org)
    monkeypatch.undo()
    assert predictions_bill() == 4
    assert sum(r.quantity for r in _ledger(org)) == Decimal("0.004")


@pytest.mark.django_db(transaction=True)
def test_concurrent_roll_ups_bill_each_charge_once(org, charge):
    """Two roll-ups at once (two beat runs overlapping): each takes charges the other has not
    locked; together they bill every charge, none twice."""
    for n in range(40):
        charge(n + 1)
    start = threading.Barrier(2, timeout=10)
    billed = []

    def run():
        try:
            start.wait()
            total = 0
            while done := predictions_bill(limit=7):
                total += done
            billed.append(total)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sum(billed) == 40
    assert sum(r.quantity for r in _ledger(org)) * 1000 == sum(range(1, 41))
    assert not PredictionCharge.objects.filter(usage=None).exists()


@pytest.mark.django_db
def test_a_retry_within_the_window_is_not_charged_again(org, charge, settings):
    settings.IDEMPOTENCY_WINDOW_S = 60
    first = charge(1, idempotency_key="k1")
    assert charge(1, idempotency_key="k1").pk == first.pk  # nothing new
    PredictionCharge.objects.filter(pk=first.pk).update(
        created_at=timezone.now() - timedelta(seconds=61)
    )
    second = charge(1, idempotency_key="k1")
    assert second.pk != first.pk and second.repeat == 2
    assert charge(1, idempotency_key="k2").repeat == 1  # another key: another request


@pytest.mark.django_db
def test_billed_charges_expire_after_the_idempotency_window_and_pending_ones_stay(
    org, charge, settings
):
    settings.IDEMPOTENCY_WINDOW_S = 60
    old = timezone.now() - timedelta(seconds=120)
    billed = [charge(1, at=old) for _ in range(3)]
    predictions_bill()
    pending = charge(1, at=old)
    assert prediction_charges_expire(now=timezone.now(), batch=2) == 3
    assert list(PredictionCharge.objects.values_list("pk", flat=True)) == [pending.pk]
    assert not PredictionCharge.objects.filter(pk__in=[c.pk for c in billed]).exists()
    assert len(_ledger(org)) == 1  # the ledger keeps what they billed
