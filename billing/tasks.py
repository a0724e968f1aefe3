"""Celery entry points of billing (thin: each calls one service)."""

from datetime import timedelta

from celery import shared_task
from django.utils import timezone

from . import invoicing, metering, services, stripe_sync
from .selectors import billing_month


@shared_task(name="billing.storage_meter", ignore_result=True)
def storage_meter() -> int:
    # The hour that just ended; a late or repeated run records nothing twice.
    return services.storage_meter(hour=timezone.now() - timedelta(hours=1))


@shared_task(name="billing.budget_alerts", ignore_result=True)
def budget_alerts() -> int:
    return services.budget_alerts_check()


@shared_task(name="billing.plan_credits", ignore_result=True)
def plan_credits() -> int:
    return services.plan_credits_grant()


@shared_task(name="billing.invoices_issue", ignore_result=True)
def invoices_issue() -> int:
    # Last month's invoices; a late or repeated run issues nothing twice.
    last_day_before = billing_month(timezone.now()) - timedelta(days=1)
    return invoicing.invoices_issue(month=last_day_before.replace(day=1))


@shared_task(name="billing.meter_push", ignore_result=True, soft_time_limit=60, time_limit=90)
def meter_push() -> int:
    """Drain the meter-event outbox, subscribe the accounts still without a subscription, and
    push new credits, while Stripe is configured (each does nothing otherwise)."""
    sent = metering.meter_push_drain()
    stripe_sync.subscriptions_ensure_missing()
    stripe_sync.credit_grants_push()
    return sent


@shared_task(name="billing.reconcile", ignore_result=True, soft_time_limit=1800, time_limit=1900)
def reconcile() -> int:
    """Compare yesterday's (UTC) ledger with Stripe's meter totals."""
    rows = metering.reconcile_day(day=(timezone.now() - timedelta(days=1)).date())
    return sum(1 for row in rows if row.difference_minor)
