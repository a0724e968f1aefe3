"""Reads of prices, spend and budgets, for jobs (placement, fair share) and for reports."""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db.models import Sum

from tenants.models import Organization

from .models import Price, UsageRecord


def price_for(*, resource: str, at: datetime) -> Price | None:
    return (
        Price.objects.filter(resource=resource, effective_from__lte=at)
        .order_by("-effective_from")
        .first()
    )


def unit_price(*, resource: str, at: datetime) -> tuple[Decimal, str]:
    price = price_for(resource=resource, at=at)
    if price is None:
        return Decimal(settings.DEFAULT_GPU_SECOND_PRICE), settings.BILLING_CURRENCY
    return price.unit_price, price.currency


def gpu_resource(resource_class_name: str) -> str:
    return f"gpu:{resource_class_name}"


def budget_allows(*, organization: Organization) -> bool:
    """Whether new placements may start; the billing issue adds budgets and past-due states."""
    return organization.status == Organization.Status.ACTIVE


def decayed_spend(
    *, organization_ids: list[int], now: datetime, half_life: timedelta
) -> dict[int, float]:
    """Each organization's recent spend, each row weighted by 0.5 ** (age / half-life)."""
    window_start = now - half_life * 8  # older rows weigh under 0.4% and are left out
    rows = UsageRecord.objects.filter(
        organization_id__in=organization_ids, period_end__gte=window_start
    ).values_list("organization_id", "period_end", "amount_minor")
    spend: dict[int, float] = defaultdict(float)
    seconds = half_life.total_seconds()
    for organization_id, period_end, amount in rows.iterator():
        age = max(0.0, (now - period_end).total_seconds())
        spend[organization_id] += amount * math.pow(0.5, age / seconds)
    return dict(spend)


def spend_for_source(*, organization: Organization, source_type: str, source_id: str) -> int:
    total = (
        UsageRecord.objects.for_organization(organization)
        .filter(source_type=source_type, source_id=source_id)
        .aggregate(total=Sum("amount_minor"))["total"]
    )
    return total or 0
