"""Celery entry points of billing (thin: each calls one service)."""

from datetime import timedelta

import stripe
from celery import shared_task
from django.utils import timezone

from . import invoicing, metering, services, stripe_gateway
from .models import BillingAccount
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
    """Drain the meter-event outbox, subscribe the accounts a lost `subscription_sync` left
    without a subscription, and push new credits, while Stripe is configured."""
    if not stripe_gateway.configured():
        return 0
    sent = metering.meter_push_drain()
    stripe_gateway.subscriptions_ensure_missing()
    stripe_gateway.credit_grants_push()
    return sent


@shared_task(
    name="billing.subscription_sync",
    ignore_result=True,
    # A racing creator holds the organization's idempotency key: later, it will have finished.
    autoretry_for=(*stripe_gateway.TRANSIENT, stripe.IdempotencyError),
    retry_backoff=True,
    max_retries=8,
    soft_time_limit=60,
    time_limit=90,
)
def subscription_sync(*, account_id: int) -> str:
    """After an account is created or changes plan: its customer, subscription and plan fee."""
    if not stripe_gateway.configured():
        return ""
    account = BillingAccount.objects.select_related("organization", "plan").get(pk=account_id)
    return stripe_gateway.subscription_plan_sync(account=account)


@shared_task(name="billing.reconcile", ignore_result=True, soft_time_limit=1800, time_limit=1900)
def reconcile() -> int:
    """Compare yesterday's (UTC) ledger with Stripe's meter totals."""
    if not stripe_gateway.configured():
        return 0
    rows = metering.reconcile_day(day=(timezone.now() - timedelta(days=1)).date())
    return sum(1 for row in rows if row.difference_minor)


@shared_task(
    name="billing.payment_method_default",
    ignore_result=True,
    autoretry_for=(stripe.APIConnectionError, stripe.APIError, stripe.RateLimitError),
    retry_backoff=True,
    max_retries=8,
    soft_time_limit=60,
    time_limit=90,
)
def payment_method_default(*, customer_id: str, setup_intent_id: str) -> str:
    """After Checkout saved a payment method: make it the customer's default for invoices."""
    return stripe_gateway.default_payment_method_set(
        customer_id=customer_id, setup_intent_id=setup_intent_id
    )
