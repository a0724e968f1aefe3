"""Writes to the ledger: one row per billable event, exactly once per idempotency key."""

from __future__ import annotations

from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal

from django.db import IntegrityError, transaction

from tenants.models import ApiKey, Organization, User

from .models import UsageRecord
from .selectors import unit_price

MINOR_UNITS = {"usd": 100, "eur": 100, "gbp": 100, "jpy": 1}


def usage_record(
    *,
    organization: Organization,
    resource: str,
    quantity: Decimal,
    unit: str,
    period_start: datetime,
    period_end: datetime,
    idempotency_key: str,
    source_type: str = "",
    source_id: str = "",
    attempt: int | None = None,
    user: User | None = None,
    api_key: ApiKey | None = None,
    labels: dict | None = None,
) -> tuple[UsageRecord, bool]:
    """Price and append one usage row; a second call with the same key returns the first row."""
    existing = UsageRecord.objects.filter(idempotency_key=idempotency_key).first()
    if existing is not None:
        return existing, False
    price, currency = unit_price(resource=resource, at=period_start)
    quantity = Decimal(quantity)
    amount = (quantity * price * MINOR_UNITS.get(currency, 100)).quantize(Decimal(1), ROUND_HALF_UP)
    try:
        with transaction.atomic():
            record = UsageRecord.objects.create(
                organization=organization,
                resource=resource,
                quantity=quantity,
                unit=unit,
                unit_price=price,
                amount_minor=int(amount),
                currency=currency,
                source_type=source_type,
                source_id=source_id,
                attempt=attempt,
                user=user,
                api_key=api_key,
                labels=labels or {},
                period_start=period_start,
                period_end=period_end,
                idempotency_key=idempotency_key,
            )
    except IntegrityError:
        # Another writer recorded the same key first; anything else is a real error.
        existing = UsageRecord.objects.filter(idempotency_key=idempotency_key).first()
        if existing is None:
            raise
        return existing, False
    return record, True
