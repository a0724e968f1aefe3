"""The one module that talks to Stripe, and all it does: customers, the metered catalog,
subscriptions, meter events, customer balance, Checkout and the Billing Portal.

It takes and returns plain values (ids, Stripe objects) and touches no table: what to ask and
what to keep of the answer is decided by the service modules (`stripe_sync`, `metering`,
`stripe_events`). Each call refuses to run inside an open database transaction, and every create
carries an idempotency key derived from our own ids, so a retry after a timeout returns the
object the first try made instead of a second one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import stripe
from django.conf import settings
from django.db import connection

from .errors import BillingError

DEAD_SUBSCRIPTION = {"canceled", "incomplete_expired"}

# Stripe trouble that passes (a timeout, a 5xx, throttling): the rest of a batch waits instead
# of hitting a server that is down once per row.
TRANSIENT = (stripe.APIConnectionError, stripe.APIError, stripe.RateLimitError)


class StripeNotConfigured(BillingError):
    code = "stripe_not_configured"
    status = 409


class StripeUnavailable(BillingError):
    code = "stripe_unavailable"
    status = 503


def configured() -> bool:
    return bool(settings.STRIPE_SECRET_KEY)


def client() -> stripe.StripeClient:
    if not configured():
        raise StripeNotConfigured(
            "Payments through Stripe are not configured here (STRIPE_SECRET_KEY is empty); "
            "invoices come from the built-in ledger."
        )
    base_addresses = {"api": settings.STRIPE_API_BASE} if settings.STRIPE_API_BASE else None
    return stripe.StripeClient(
        api_key=settings.STRIPE_SECRET_KEY,
        base_addresses=base_addresses,
        # Retries belong to the callers (the outbox backs off); a hung call must not hold a
        # worker for Stripe's default 80 s.
        max_network_retries=0,
        http_client=stripe.RequestsClient(timeout=settings.STRIPE_TIMEOUT_S),
    )


def _outside_transaction() -> None:
    """Refuse a network call inside an open transaction (a test case's own block excepted)."""
    if any(not getattr(block, "_from_testcase", False) for block in connection.atomic_blocks):
        raise RuntimeError("Stripe is called inside an open database transaction")


def event_name(resource: str) -> str:
    """The meter's event name for one of our resources ("gpu:a100-40gb" -> "fs_gpu_a100_40gb")."""
    return "fs_" + re.sub(r"[^a-z0-9]+", "_", resource.lower()).strip("_")


def metadata(stripe_object) -> dict:
    return stripe_object.to_dict().get("metadata") or {}


# Customers and the catalog


def customer_create(*, organization_id: int, slug: str, name: str, email: str = "") -> str:
    """A customer for the organization; one per organization however often it is asked."""
    _outside_transaction()
    params = {
        "name": name,
        "metadata": {"organization_id": str(organization_id), "organization_slug": slug},
    }
    if email:
        params["email"] = email
    customer = client().v1.customers.create(
        params, {"idempotency_key": f"customer-org-{organization_id}"}
    )
    return customer.id


def meter_create(*, resource: str) -> str:
    """A meter summing the minor units of one resource's events."""
    _outside_transaction()
    meter = client().v1.billing.meters.create(
        {
            "display_name": f"{resource} (minor units)",
            "event_name": event_name(resource),
            "default_aggregation": {"formula": "sum"},
            "customer_mapping": {"type": "by_id", "event_payload_key": "stripe_customer_id"},
            "value_settings": {"event_payload_key": "value"},
        },
        {"idempotency_key": f"meter-{event_name(resource)}"},
    )
    return meter.id


def product_create(*, resource: str) -> str:
    _outside_transaction()
    product = client().v1.products.create(
        {"name": f"Usage: {resource}", "metadata": {"resource": resource}},
        {"idempotency_key": f"product-{event_name(resource)}"},
    )
    return product.id


def metered_price_create(*, resource: str, product_id: str, meter_id: str) -> str:
    """A monthly price of one minor unit per unit on the meter.

    Meter events carry the ledger row's amount in minor units, so Stripe's totals equal the
    ledger to the cent and our versioned rate card stays the one that prices usage.
    """
    _outside_transaction()
    price = client().v1.prices.create(
        {
            "currency": settings.BILLING_CURRENCY,
            "unit_amount": 1,
            "product": product_id,
            "recurring": {"interval": "month", "usage_type": "metered", "meter": meter_id},
            "metadata": {"resource": resource},
        },
        {"idempotency_key": f"price-{event_name(resource)}-{meter_id}"},
    )
    return price.id


def fee_product_create(*, plan_code: str, plan_name: str) -> str:
    _outside_transaction()
    product = client().v1.products.create(
        {"name": f"{plan_name} plan", "metadata": {"plan": plan_code}},
        {"idempotency_key": f"product-plan-{plan_code}"},
    )
    return product.id


def fee_price_create(*, plan_code: str, fee_minor: int, key: str, product_id: str) -> str:
    """A flat monthly price; `key` names the plan, fee and currency it stands for."""
    _outside_transaction()
    price = client().v1.prices.create(
        {
            "currency": settings.BILLING_CURRENCY,
            "unit_amount": fee_minor,
            "product": product_id,
            "recurring": {"interval": "month"},
            "metadata": {"plan": plan_code},
        },
        {"idempotency_key": f"price-plan-{key}"},
    )
    return price.id


# Subscriptions


def subscription_find(*, customer_id: str, organization_id: int):
    """A live subscription Stripe holds for the organization (made by an earlier try whose
    answer, or whose write of the id, was lost), or None."""
    _outside_transaction()
    page = client().v1.subscriptions.list({"customer": customer_id, "limit": 100})
    for subscription in page.auto_paging_iter():
        if subscription["status"] in DEAD_SUBSCRIPTION:
            continue
        if metadata(subscription).get("organization_id") == str(organization_id):
            return subscription
    return None


def subscription_create(
    *, customer_id: str, organization_id: int, items: list[dict], anchor: datetime
):
    """A subscription to `items`, its cycle anchored at `anchor` without prorating the days
    before it. The idempotency key is the organization's alone: two creators racing get one
    subscription, the loser an IdempotencyError."""
    _outside_transaction()
    return client().v1.subscriptions.create(
        {
            "customer": customer_id,
            "items": items,
            "billing_cycle_anchor": int(anchor.timestamp()),
            "proration_behavior": "none",
            # A fee invoice without a card yet stays open (and the card comes from Checkout)
            # instead of failing the whole subscription.
            "payment_behavior": "allow_incomplete",
            "metadata": {"organization_id": str(organization_id)},
        },
        {"idempotency_key": f"subscription-org-{organization_id}"},
    )


def subscription_items(subscription) -> Iterable:
    """Every item of a subscription Stripe returned (it embeds the first ten)."""
    if not subscription["items"]["has_more"]:
        return subscription["items"]["data"]
    return subscription_items_list(subscription_id=subscription["id"])


def subscription_items_list(*, subscription_id: str) -> Iterable:
    _outside_transaction()
    page = client().v1.subscription_items.list({"subscription": subscription_id, "limit": 100})
    return page.auto_paging_iter()


def subscription_items_change(*, subscription_id: str, changes: list[dict]) -> None:
    """Add or delete items, without proration (a change takes effect on the next invoice)."""
    _outside_transaction()
    client().v1.subscriptions.update(
        subscription_id, {"items": changes, "proration_behavior": "none"}
    )


def subscription_item_create(*, subscription_id: str, price_id: str) -> str:
    _outside_transaction()
    item = client().v1.subscription_items.create(
        {"subscription": subscription_id, "price": price_id},
        {"idempotency_key": f"subscription-item-{subscription_id}-{price_id}"},
    )
    return item.id


# Meter events


class DuplicateMeterEvent(Exception):
    """Stripe already holds an event with this identifier: the push happened before."""


@dataclass(frozen=True)
class MeterEvent:
    event_name: str
    customer_id: str
    value_minor: int
    identifier: str
    timestamp: datetime


def meter_event_send(*, event: MeterEvent, stripe_client: stripe.StripeClient | None = None) -> str:
    """Send one meter event; its identifier doubles as the idempotency key."""
    _outside_transaction()
    try:
        sent = (stripe_client or client()).v1.billing.meter_events.create(
            {
                "event_name": event.event_name,
                "payload": {
                    "stripe_customer_id": event.customer_id,
                    "value": str(event.value_minor),
                },
                "identifier": event.identifier,
                "timestamp": int(event.timestamp.timestamp()),
            },
            {"idempotency_key": event.identifier},
        )
    except stripe.InvalidRequestError as error:
        if _is_duplicate(error):
            raise DuplicateMeterEvent(str(error)) from error
        raise
    return sent.identifier


def _is_duplicate(error: stripe.InvalidRequestError) -> bool:
    message = (error.user_message or str(error)).lower()
    return error.code == "resource_already_exists" or (
        "identifier" in message and "already" in message
    )


def meter_event_summaries(
    *, meter_id: str, customer_id: str, start: datetime, end: datetime
) -> int:
    """Stripe's sum of a customer's events on a meter over [start, end), in minor units."""
    _outside_transaction()
    total = 0
    params = {
        "customer": customer_id,
        "start_time": int(start.timestamp()),
        "end_time": int(end.timestamp()),
        "limit": 100,
    }
    page = client().v1.billing.meters.event_summaries.list(meter_id, params)
    for summary in page.auto_paging_iter():
        total += round(summary.aggregated_value)
    return total


# Customer balance, Checkout and the portal


def balance_credit_create(
    *, customer_id: str, amount_minor: int, currency: str, description: str, credit_grant_id: int
) -> str:
    """Credit the customer's balance (Stripe applies it to the next invoices); returns the
    balance transaction's id. One per grant however often it is asked."""
    _outside_transaction()
    entry = client().v1.customers.balance_transactions.create(
        customer_id,
        {
            "amount": -amount_minor,
            "currency": currency,
            "description": description[:350],
            "metadata": {"credit_grant_id": str(credit_grant_id)},
        },
        {"idempotency_key": f"credit-grant-{credit_grant_id}"},
    )
    return entry.id


def checkout_session_create(
    *, customer_id: str, organization_id: int, success_url: str, cancel_url: str
) -> str:
    """A Checkout page (setup mode) where the customer saves a payment method; its address."""
    _outside_transaction()
    session = client().v1.checkout.sessions.create(
        {
            "mode": "setup",
            "customer": customer_id,
            "currency": settings.BILLING_CURRENCY,
            "success_url": success_url,
            "cancel_url": cancel_url,
            "metadata": {"organization_id": str(organization_id)},
        }
    )
    return session.url


def portal_session_create(*, customer_id: str, return_url: str) -> str:
    """A Billing Portal page (payment methods, invoices, billing details); its address."""
    _outside_transaction()
    session = client().v1.billing_portal.sessions.create(
        {"customer": customer_id, "return_url": return_url}
    )
    return session.url


def default_payment_method_set(*, customer_id: str, setup_intent_id: str) -> str:
    """Make the payment method a setup-mode Checkout saved the one invoices are charged to."""
    _outside_transaction()
    api = client().v1
    intent = api.setup_intents.retrieve(setup_intent_id)
    method = intent.payment_method
    method_id = method if isinstance(method, str) or method is None else method.id
    if not method_id:
        return ""
    api.customers.update(customer_id, {"invoice_settings": {"default_payment_method": method_id}})
    return method_id


def unavailable(error: stripe.StripeError) -> StripeUnavailable:
    return StripeUnavailable(
        f"Stripe did not answer as expected ({type(error).__name__}); try again in a minute."
    )
