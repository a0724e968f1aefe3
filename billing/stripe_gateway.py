"""The one module that talks to Stripe: customers, the metered catalog, subscriptions, meter
events, credit balance, Checkout and the Billing Portal.

Each function makes its network calls outside any database transaction and writes what it
learnt afterwards, in a short one. Every create carries an idempotency key derived from our own
ids, so a retry after a timeout returns the object the first try made instead of a second one.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime

import stripe
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from .errors import BillingError
from .models import BillingAccount, CreditGrant, Plan, Price, StripeObject
from .selectors import billing_month, month_bounds

logger = logging.getLogger(__name__)

METER = "meter"
PRODUCT = "product"
PRICE = "price"
FEE_PRODUCT = "fee_product"
FEE_PRICE = "fee_price"
SUBSCRIPTION_ITEM = "subscription_item"
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


def _remember(*, kind: str, key: str, stripe_id: str) -> str:
    """Store a mapping once; a concurrent writer's first value wins and is returned."""
    with transaction.atomic():
        row, _ = StripeObject.objects.get_or_create(
            kind=kind, key=key, defaults={"stripe_id": stripe_id}
        )
    return row.stripe_id


def _known(kind: str, key: str) -> str | None:
    return (
        StripeObject.objects.filter(kind=kind, key=key).values_list("stripe_id", flat=True).first()
    )


# Customers and the catalog


def customer_ensure(*, account: BillingAccount) -> str:
    """The organization's Stripe customer id, creating the customer on first use."""
    if account.stripe_customer_id:
        return account.stripe_customer_id
    _outside_transaction()
    organization = account.organization
    params = {
        "name": organization.name,
        "metadata": {
            "organization_id": str(organization.pk),
            "organization_slug": organization.slug,
        },
    }
    if account.billing_email:
        params["email"] = account.billing_email
    customer = client().v1.customers.create(
        params, {"idempotency_key": f"customer-org-{organization.pk}"}
    )
    with transaction.atomic():
        BillingAccount.objects.filter(pk=account.pk, stripe_customer_id="").update(
            stripe_customer_id=customer.id
        )
        account.stripe_customer_id = BillingAccount.objects.values_list(
            "stripe_customer_id", flat=True
        ).get(pk=account.pk)
    # Events Stripe sent before the id was ours were kept aside as unmatched: apply them now.
    from .webhooks import unmatched_events_apply  # webhooks import this module

    unmatched_events_apply(customer_id=account.stripe_customer_id)
    return account.stripe_customer_id


def billable_resources() -> list[str]:
    return sorted(set(Price.objects.values_list("resource", flat=True)))


def resource_ensure(*, resource: str) -> str:
    """A meter, a product and a metered price (1 minor unit per unit) for one resource.

    Meter events carry the ledger row's amount in minor units, so Stripe's totals equal the
    ledger to the cent and our versioned rate card stays the one that prices usage.
    Returns the price id.
    """
    price_id = _known(PRICE, resource)
    if price_id:
        return price_id
    _outside_transaction()
    api = client().v1
    meter_id = _known(METER, resource)
    if meter_id is None:
        meter = api.billing.meters.create(
            {
                "display_name": f"{resource} (minor units)",
                "event_name": event_name(resource),
                "default_aggregation": {"formula": "sum"},
                "customer_mapping": {"type": "by_id", "event_payload_key": "stripe_customer_id"},
                "value_settings": {"event_payload_key": "value"},
            },
            {"idempotency_key": f"meter-{event_name(resource)}"},
        )
        meter_id = _remember(kind=METER, key=resource, stripe_id=meter.id)
    product_id = _known(PRODUCT, resource)
    if product_id is None:
        product = api.products.create(
            {"name": f"Usage: {resource}", "metadata": {"resource": resource}},
            {"idempotency_key": f"product-{event_name(resource)}"},
        )
        product_id = _remember(kind=PRODUCT, key=resource, stripe_id=product.id)
    price = api.prices.create(
        {
            "currency": settings.BILLING_CURRENCY,
            "unit_amount": 1,
            "product": product_id,
            "recurring": {"interval": "month", "usage_type": "metered", "meter": meter_id},
            "metadata": {"resource": resource},
        },
        {"idempotency_key": f"price-{event_name(resource)}-{meter_id}"},
    )
    return _remember(kind=PRICE, key=resource, stripe_id=price.id)


def fee_price_ensure(*, plan: Plan) -> str | None:
    """A flat monthly price for the plan's fee, or None for a plan without one."""
    if plan.monthly_fee_minor <= 0:
        return None
    key = f"{plan.code}:{plan.monthly_fee_minor}:{settings.BILLING_CURRENCY}"
    price_id = _known(FEE_PRICE, key)
    if price_id:
        return price_id
    _outside_transaction()
    api = client().v1
    product_id = _known(FEE_PRODUCT, plan.code)
    if product_id is None:
        product = api.products.create(
            {"name": f"{plan.name} plan", "metadata": {"plan": plan.code}},
            {"idempotency_key": f"product-plan-{plan.code}"},
        )
        product_id = _remember(kind=FEE_PRODUCT, key=plan.code, stripe_id=product.id)
    price = api.prices.create(
        {
            "currency": settings.BILLING_CURRENCY,
            "unit_amount": plan.monthly_fee_minor,
            "product": product_id,
            "recurring": {"interval": "month"},
            "metadata": {"plan": plan.code},
        },
        {"idempotency_key": f"price-plan-{key}"},
    )
    return _remember(kind=FEE_PRICE, key=key, stripe_id=price.id)


def catalog_ensure() -> dict[str, str]:
    """Every billable resource's metered price, and every active plan's fee; resource -> price."""
    prices = {resource: resource_ensure(resource=resource) for resource in billable_resources()}
    for plan in Plan.objects.filter(active=True):
        fee_price_ensure(plan=plan)
    return prices


def meter_ids() -> dict[str, str]:
    """resource -> meter id, for the resources whose catalog exists."""
    return dict(StripeObject.objects.filter(kind=METER).values_list("key", "stripe_id"))


def resource_for_price(price_id: str) -> str:
    return (
        StripeObject.objects.filter(kind=PRICE, stripe_id=price_id)
        .values_list("key", flat=True)
        .first()
        or ""
    )


def _next_month_start(now: datetime) -> datetime:
    return month_bounds(billing_month(now))[1]


def _items_remember(subscription) -> None:
    """Map the subscription's metered items to our resources (the fee item is read live)."""
    items = subscription["items"]["data"]
    if subscription["items"]["has_more"]:  # Stripe embeds the first ten
        _outside_transaction()
        page = client().v1.subscription_items.list(
            {"subscription": subscription["id"], "limit": 100}
        )
        items = page.auto_paging_iter()
    for item in items:
        resource = resource_for_price(item["price"]["id"])
        if resource:
            _remember(
                kind=SUBSCRIPTION_ITEM, key=f"{subscription['id']}:{resource}", stripe_id=item["id"]
            )


def _subscription_found(*, customer_id: str, organization_id: int):
    """A live subscription Stripe holds for the organization, made by an earlier try whose
    answer (or whose write of the id) was lost."""
    _outside_transaction()
    page = client().v1.subscriptions.list({"customer": customer_id, "limit": 100})
    for subscription in page.auto_paging_iter():
        if subscription["status"] in DEAD_SUBSCRIPTION:
            continue
        if _metadata(subscription).get("organization_id") == str(organization_id):
            return subscription
    return None


def subscription_ensure(*, account: BillingAccount) -> str:
    """A subscription to every metered price and the plan's fee; its id is stored once.

    The billing cycle is anchored to the first of next month (UTC), without prorating the days
    before it, so Stripe's invoice periods are our calendar months. The idempotency key is the
    organization's alone: two creators racing (account creation and a plan change, say) get
    one subscription, the loser an IdempotencyError its task retries; the plan is then set by
    `subscription_plan_sync`.
    """
    if account.stripe_subscription_id:
        return account.stripe_subscription_id
    customer_id = customer_ensure(account=account)
    subscription = _subscription_found(
        customer_id=customer_id, organization_id=account.organization_id
    )
    if subscription is None:
        items = [{"price": price_id} for price_id in catalog_ensure().values()]
        fee = fee_price_ensure(plan=account.plan)
        if fee:
            items.append({"price": fee, "quantity": 1})
        if not items:
            raise BillingError("There is nothing to subscribe to: the price list is empty.")
        _outside_transaction()
        subscription = client().v1.subscriptions.create(
            {
                "customer": customer_id,
                "items": items,
                "billing_cycle_anchor": int(_next_month_start(timezone.now()).timestamp()),
                "proration_behavior": "none",
                # A fee invoice without a card yet stays open (and the card comes from
                # Checkout) instead of failing the whole subscription.
                "payment_behavior": "allow_incomplete",
                "metadata": {"organization_id": str(account.organization_id)},
            },
            {"idempotency_key": f"subscription-org-{account.organization_id}"},
        )
    with transaction.atomic():
        BillingAccount.objects.filter(pk=account.pk, stripe_subscription_id="").update(
            stripe_subscription_id=subscription.id
        )
        account.stripe_subscription_id = BillingAccount.objects.values_list(
            "stripe_subscription_id", flat=True
        ).get(pk=account.pk)
    if account.stripe_subscription_id == subscription.id:
        _items_remember(subscription)
    return account.stripe_subscription_id


def _metadata(stripe_object) -> dict:
    return stripe_object.to_dict().get("metadata") or {}


def _is_fee(item, fee_prices: set[str]) -> bool:
    price = item["price"]
    return price["id"] in fee_prices or bool(_metadata(price).get("plan"))


def subscription_plan_sync(*, account: BillingAccount, attempts: int = 3) -> str:
    """Ensure the customer and subscription, then make its fee item the plan's fee (none for a
    free plan); metered items stay.

    Idempotent by reading first: the change is computed from the items Stripe holds, so a
    repeat (after a lost answer, say) finds nothing to do. It carries no idempotency key, as
    the same change recurs legitimately (a paid plan, a free one, the paid one again). A
    racing sync that changed the items first makes Stripe refuse ours (an item deleted twice,
    a price added twice); it is then computed again from a fresh read of plan and items.

    A plan change takes effect on the next invoice, without proration, as the built-in ledger
    bills the fee of the plan held when the month's invoice is issued.
    """
    subscription_id = subscription_ensure(account=account)
    plan = account.plan
    for attempt in range(1, attempts + 1):
        changes = _fee_changes(subscription_id=subscription_id, plan=plan)
        if not changes:
            break
        _outside_transaction()
        try:
            client().v1.subscriptions.update(
                subscription_id, {"items": changes, "proration_behavior": "none"}
            )
        except stripe.InvalidRequestError:
            if attempt == attempts:
                raise
            plan = Plan.objects.get(accounts=account)
        else:
            break
    return subscription_id


def _fee_changes(*, subscription_id: str, plan: Plan) -> list[dict]:
    """The item changes that leave the subscription with exactly the plan's fee item."""
    wanted = fee_price_ensure(plan=plan)
    fee_prices = set(
        StripeObject.objects.filter(kind=FEE_PRICE).values_list("stripe_id", flat=True)
    )
    _outside_transaction()
    page = client().v1.subscription_items.list({"subscription": subscription_id, "limit": 100})
    fees = [item for item in page.auto_paging_iter() if _is_fee(item, fee_prices)]
    kept = next((item for item in fees if item["price"]["id"] == wanted), None)
    changes: list[dict] = [{"id": item["id"], "deleted": True} for item in fees if item is not kept]
    if wanted and kept is None:
        changes.append({"price": wanted, "quantity": 1})
    return changes


def subscriptions_ensure_missing(*, limit: int = 10) -> int:
    """The safety net behind the task queued when an account is created: subscribe accounts
    still lacking a subscription (a lost task, Stripe down at the time). Returns how many.

    Run every few seconds by the push task, so a few at a time (a run stays well inside its
    time limit), in random order (accounts Stripe keeps refusing do not starve the others).
    """
    accounts = (
        BillingAccount.objects.filter(stripe_subscription_id="")
        .select_related("organization", "plan")
        .order_by("?")[:limit]
    )
    ensured = 0
    for account in accounts:
        try:
            subscription_plan_sync(account=account)
        except TRANSIENT as error:
            logger.warning("subscriptions: Stripe unavailable, later: %s", error)
            break
        except (stripe.StripeError, BillingError) as error:
            logger.warning("subscription for %s not ensured: %s", account.organization_id, error)
        else:
            ensured += 1
    return ensured


def subscription_item_ensure(*, account: BillingAccount, resource: str) -> str:
    """The subscription's item for a resource's metered price (a resource priced after the
    subscription began is added to it, so its usage is billed too)."""
    subscription_id = subscription_ensure(account=account)
    key = f"{subscription_id}:{resource}"
    item_id = _known(SUBSCRIPTION_ITEM, key)
    if item_id:
        return item_id
    price_id = resource_ensure(resource=resource)
    _outside_transaction()
    item = client().v1.subscription_items.create(
        {"subscription": subscription_id, "price": price_id},
        {"idempotency_key": f"subscription-item-{subscription_id}-{price_id}"},
    )
    return _remember(kind=SUBSCRIPTION_ITEM, key=key, stripe_id=item.id)


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


# Credits, Checkout and the portal


def credit_grant_push(*, grant: CreditGrant) -> str:
    """Move a credit's remainder to Stripe as a negative customer balance, which Stripe applies
    to the next invoices.

    The grant's `remaining_minor` drops to 0 in the transaction that records the balance
    transaction, so the credit is spent once, by Stripe, and no longer counts as available
    here. Stripe's customer balance does not expire: a grant's `expires_at` no longer applies
    once it is moved.
    """
    if grant.stripe_transaction_id:
        return grant.stripe_transaction_id
    account = BillingAccount.objects.select_related("organization", "plan").get(
        organization_id=grant.organization_id
    )
    customer_id = customer_ensure(account=account)
    _outside_transaction()
    transaction_ = client().v1.customers.balance_transactions.create(
        customer_id,
        {
            "amount": -grant.remaining_minor,
            "currency": grant.currency,
            "description": grant.reason[:350],
            "metadata": {"credit_grant_id": str(grant.pk)},
        },
        {"idempotency_key": f"credit-grant-{grant.pk}"},
    )
    with transaction.atomic():
        moved = CreditGrant.objects.filter(pk=grant.pk, stripe_transaction_id="").update(
            stripe_transaction_id=transaction_.id, remaining_minor=0
        )
    if moved:
        grant.stripe_transaction_id, grant.remaining_minor = transaction_.id, 0
    else:  # a concurrent push (same idempotency key, same transaction) recorded it first
        grant.refresh_from_db(fields=["stripe_transaction_id", "remaining_minor"])
    return transaction_.id


def credit_grants_push(*, limit: int = 100) -> int:
    """Push the unused credits Stripe does not hold yet, of organizations that are customers.

    A credit already used up by built-in invoices (before Stripe was configured) stays ours.
    A grant Stripe refuses is logged and retried on the next run; the others still go. Stripe
    being unavailable stops the run (the next one tries again).
    """
    customers = BillingAccount.objects.exclude(stripe_customer_id="").values("organization_id")
    grants = CreditGrant.objects.filter(
        Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now()),
        stripe_transaction_id="",
        remaining_minor__gt=0,
        organization_id__in=customers,
    ).order_by("pk")[:limit]
    pushed = 0
    for grant in grants:
        try:
            credit_grant_push(grant=grant)
        except TRANSIENT as error:
            logger.warning("credit push: Stripe unavailable, later: %s", error)
            break
        except (stripe.StripeError, BillingError) as error:
            logger.error("credit grant %s not pushed to Stripe: %s", grant.pk, error)
        else:
            pushed += 1
    return pushed


def checkout_session_create(*, account: BillingAccount, success_url: str, cancel_url: str) -> str:
    """A Checkout page (setup mode) where the organization saves a payment method."""
    client()  # not configured: say so before anything else
    try:
        customer_id = customer_ensure(account=account)
        _outside_transaction()
        session = client().v1.checkout.sessions.create(
            {
                "mode": "setup",
                "customer": customer_id,
                "currency": settings.BILLING_CURRENCY,
                "success_url": success_url,
                "cancel_url": cancel_url,
                "metadata": {"organization_id": str(account.organization_id)},
            }
        )
    except stripe.StripeError as error:
        raise _unavailable(error) from error
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


def portal_session_create(*, account: BillingAccount, return_url: str) -> str:
    """A Billing Portal page: payment methods, invoices and billing details."""
    client()
    try:
        customer_id = customer_ensure(account=account)
        _outside_transaction()
        session = client().v1.billing_portal.sessions.create(
            {"customer": customer_id, "return_url": return_url}
        )
    except stripe.StripeError as error:
        raise _unavailable(error) from error
    return session.url


def _unavailable(error: stripe.StripeError) -> StripeUnavailable:
    return StripeUnavailable(
        f"Stripe did not answer as expected ({type(error).__name__}); try again in a minute."
    )
