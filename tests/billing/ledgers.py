"""Ledger rows for the tests of usage reports and of the operators' billing page: a price list,
one usage row, a month of usage across tenants."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from django.utils import timezone

from billing.models import Price
from billing.selectors import billing_month, month_bounds
from billing.services import usage_record
from tests.factories import OrganizationFactory


def prices_create():
    since = datetime(2020, 1, 1, tzinfo=UTC)
    for resource, unit, price in [
        ("gpu:a100", "gpu_second", "0.0011"),
        ("gpu:t4", "gpu_second", "0.0002"),
        ("predictions", "1k_predictions", "0.5"),
        ("storage", "gb_month", "0.023"),
    ]:
        Price.objects.create(
            resource=resource, unit=unit, unit_price=Decimal(price), effective_from=since
        )


def record(organization, *, resource, quantity, end, key, **fields):
    row, created = usage_record(
        organization=organization,
        resource=resource,
        quantity=Decimal(quantity),
        unit=fields.pop("unit", "gpu_second"),
        period_start=end - timedelta(seconds=1),
        period_end=end,
        idempotency_key=f"test:{organization.pk}:{key}",
        **fields,
    )
    assert created
    return row


def month_ledger_create():
    """Usage this month in three organizations, and last month's in one (prices first)."""
    now = timezone.now()
    since, _ = month_bounds(billing_month(now))
    orgs = [OrganizationFactory() for _ in range(3)]
    rows = []
    for n, org in enumerate(orgs):
        rows.append(
            record(
                org,
                resource="gpu:a100",
                quantity=str(3600 * (n + 1)),
                end=since + timedelta(minutes=n + 1),
                key="gpu",
            )
        )
        rows.append(
            record(
                org,
                resource="storage",
                quantity="2",
                unit="gb_month",
                end=since + timedelta(minutes=5),
                key="storage",
            )
        )
    rows.append(
        record(
            orgs[0], resource="gpu:t4", quantity="1800", end=since + timedelta(minutes=7), key="t4"
        )
    )
    record(
        orgs[1],
        resource="gpu:a100",
        quantity="99999",
        end=since - timedelta(seconds=1),
        key="last-month",
    )
    return {"now": now, "orgs": orgs, "rows": rows}
