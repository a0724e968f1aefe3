"""The meter-event outbox (ledger rows -> Stripe meter events) and the daily reconciliation.

`usage_record` writes a MeterPush row with each ledger row, in the same transaction. Here rows
are claimed in a short transaction (leased by moving `next_attempt_at` on), sent with no
transaction open, and marked sent only after Stripe accepted them. The event's identifier and
idempotency key are the ledger row's, so a resend after a lost answer is never counted twice.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import stripe
from django.conf import settings
from django.db import transaction
from django.db.models import F, Sum
from django.utils import timezone

from tenants.models import Organization

from . import services, stripe_gateway, stripe_sync
from .errors import BillingError
from .models import BillingAccount, MeterPush, Reconciliation, UsageRecord
from .selectors import meter_ids

logger = logging.getLogger(__name__)

TRANSIENT = stripe_gateway.TRANSIENT


@dataclass
class PushResult:
    claimed: int = 0
    sent: int = 0
    failed: int = 0
    transient_failure: bool = False
    errors: list[str] = field(default_factory=list)


def backoff(attempts: int) -> timedelta:
    """Delay before try number `attempts + 1`: doubling from the base, capped, with jitter."""
    ceiling = min(
        settings.STRIPE_PUSH_BACKOFF_MAX_S, settings.STRIPE_PUSH_BACKOFF_S * 2 ** min(attempts, 30)
    )
    return timedelta(seconds=ceiling * random.uniform(0.5, 1.0))  # noqa: S311 (jitter)


def _lease() -> timedelta:
    # Long enough for a batch's calls to time out one by one; a crashed pusher's rows come back.
    return timedelta(seconds=settings.STRIPE_TIMEOUT_S * 2 + 30)


def _claim(*, limit: int, now: datetime) -> dict[int, int]:
    """Lease up to `limit` due rows to this pusher; returns usage id -> attempts so far."""
    with transaction.atomic():
        claimed = dict(
            MeterPush.objects.select_for_update(skip_locked=True)
            .filter(state=MeterPush.State.PENDING, next_attempt_at__lte=now)
            .order_by("next_attempt_at", "usage_id")
            .values_list("usage_id", "attempts")[:limit]
        )
        if claimed:
            MeterPush.objects.filter(usage_id__in=claimed).update(next_attempt_at=now + _lease())
    return claimed


def meter_push_due(*, limit: int | None = None, now: datetime | None = None) -> PushResult:
    """Send up to `limit` due outbox rows as meter events; failures back off and stay pending."""
    limit = limit or settings.STRIPE_PUSH_BATCH
    now = now or timezone.now()
    result = PushResult()
    attempts = _claim(limit=limit, now=now)
    result.claimed = len(attempts)
    if not attempts:
        return result
    rows = list(
        UsageRecord.objects.filter(pk__in=attempts)
        .order_by("pk")
        .values(
            "pk",
            "organization_id",
            "resource",
            "amount_minor",
            "period_end",
            customer=F("organization__billing_billingaccount_set__stripe_customer_id"),
        )
    )
    sent: list[int] = []
    failed: dict[int, str] = {}
    customers: dict[int, str] = {}
    ready: set[tuple[int, str]] = set()  # (organization, resource) with a meter and an item
    api = stripe_gateway.client()
    for position, row in enumerate(rows):
        try:
            customer_id = row["customer"] or customers.get(row["organization_id"])
            if not customer_id:
                customer_id = _customer_for(organization_id=row["organization_id"])
                customers[row["organization_id"]] = customer_id
            subscribed = (row["organization_id"], row["resource"])
            if subscribed not in ready:
                _catalog_for(organization_id=row["organization_id"], resource=row["resource"])
                ready.add(subscribed)
            stripe_gateway.meter_event_send(
                event=stripe_gateway.MeterEvent(
                    event_name=stripe_gateway.event_name(row["resource"]),
                    customer_id=customer_id,
                    value_minor=row["amount_minor"],
                    identifier=f"usage-{row['pk']}",
                    timestamp=row["period_end"],
                ),
                stripe_client=api,
            )
        except stripe_gateway.DuplicateMeterEvent:
            sent.append(row["pk"])
        except TRANSIENT as error:
            failed[row["pk"]] = _describe(error)
            result.transient_failure = True
            # Not tried: back to due at once, with no attempt counted.
            untried = [later["pk"] for later in rows[position + 1 :]]
            if untried:
                MeterPush.objects.filter(
                    usage_id__in=untried, state=MeterPush.State.PENDING
                ).update(next_attempt_at=now)
            break
        except (stripe.StripeError, BillingError) as error:
            # Refused (a bad request, an empty catalog): retried with backoff, and shown to
            # operators by selectors.meter_push_stuck once it keeps failing.
            failed[row["pk"]] = _describe(error)
        else:
            sent.append(row["pk"])
    _settle(sent=sent, failed={pk: (error, attempts[pk]) for pk, error in failed.items()})
    result.sent, result.failed = len(sent), len(failed)
    result.errors = sorted(set(failed.values()))
    return result


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"[:2000]


def _customer_for(*, organization_id: int) -> str:
    account = (
        BillingAccount.objects.select_related("organization", "plan")
        .filter(organization_id=organization_id)
        .first()
    )
    if account is None:
        organization = Organization.objects.get(pk=organization_id)
        account = services.billing_account_ensure(organization=organization)
    return stripe_sync.customer_ensure(account=account)


def _catalog_for(*, organization_id: int, resource: str) -> None:
    account = BillingAccount.objects.select_related("organization", "plan").get(
        organization_id=organization_id
    )
    stripe_sync.resource_ensure(resource=resource)
    stripe_sync.subscription_item_ensure(account=account, resource=resource)


def _settle(*, sent: list[int], failed: dict[int, tuple[str, int]]) -> None:
    """Mark what Stripe accepted as sent; back off what it did not (attempts as claimed)."""
    now = timezone.now()
    with transaction.atomic():
        if sent:
            MeterPush.objects.filter(usage_id__in=sent, state=MeterPush.State.PENDING).update(
                state=MeterPush.State.SENT, sent_at=now, last_error=""
            )
        for usage_id, (error, attempts) in failed.items():
            MeterPush.objects.filter(usage_id=usage_id, state=MeterPush.State.PENDING).update(
                attempts=attempts + 1, next_attempt_at=now + backoff(attempts), last_error=error
            )


def meter_push_drain(*, budget_s: float | None = None, limit: int | None = None) -> int:
    """Push batches until nothing is due, Stripe is failing, or the time budget is spent."""
    if not stripe_gateway.configured():
        return 0
    budget_s = settings.STRIPE_PUSH_BUDGET_S if budget_s is None else budget_s
    deadline = timezone.now() + timedelta(seconds=budget_s)
    sent = 0
    while True:
        result = meter_push_due(limit=limit)
        sent += result.sent
        if result.errors:
            logger.warning("meter push: %d failed: %s", result.failed, "; ".join(result.errors))
        if not result.claimed or result.transient_failure or timezone.now() >= deadline:
            return sent


# Reconciliation


def reconcile_day(*, day: date) -> list[Reconciliation]:
    """Compare each customer's ledger total per resource for one UTC day with Stripe's meter.

    The ledger side is one grouped query for every customer; Stripe is asked per customer and
    meter (its summaries take one customer), with no transaction open. Without Stripe: nothing.
    """
    if not stripe_gateway.configured():
        return []
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    end = start + timedelta(days=1)
    meters = meter_ids()
    customers = BillingAccount.objects.exclude(stripe_customer_id="")
    accounts = list(customers.select_related("organization").order_by("pk"))
    ledgers: dict[int, dict[str, int]] = defaultdict(dict)
    totals = (
        UsageRecord.objects.filter(
            organization_id__in=customers.values("organization_id"),
            period_end__gte=start,
            period_end__lt=end,
            # Rows recorded before Stripe was configured never enter the outbox.
            meter_push__isnull=False,
        )
        .values("organization_id", "resource")
        .annotate(total=Sum("amount_minor"))
        .values_list("organization_id", "resource", "total")
    )
    for organization_id, resource, total in totals:
        ledgers[organization_id][resource] = total
    results = []
    for account in accounts:
        ledger = ledgers.get(account.organization_id, {})
        for resource in sorted(set(meters) | set(ledger)):
            meter_id = meters.get(resource)
            stripe_minor = (
                stripe_gateway.meter_event_summaries(
                    meter_id=meter_id,
                    customer_id=account.stripe_customer_id,
                    start=start,
                    end=end,
                )
                if meter_id
                else 0
            )
            ledger_minor = ledger.get(resource) or 0
            if not ledger_minor and not stripe_minor:
                continue
            row, _ = Reconciliation.objects.update_or_create(
                organization=account.organization,
                day=day,
                resource=resource,
                defaults={
                    "ledger_minor": ledger_minor,
                    "stripe_minor": stripe_minor,
                    "checked_at": timezone.now(),
                },
            )
            if row.difference_minor:
                logger.warning(
                    "reconciliation: %s %s %s: ledger %d, Stripe %d (difference %d)",
                    account.organization.slug,
                    day,
                    resource,
                    ledger_minor,
                    stripe_minor,
                    row.difference_minor,
                )
            results.append(row)
    return results
