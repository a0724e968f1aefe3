"""Keeps our rows and Stripe's objects in step: each organization's customer and subscription,
the metered catalog, the subscription's fee item, and credits moved to the customer balance.

Each function asks Stripe (through `stripe_gateway`, with no transaction open) and then writes
what it learnt in a short transaction of its own; reading first makes each one safe to repeat.
"""

from __future__ import annotations

import logging
from datetime import datetime

import stripe
from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from outbox.services import handler

from . import stripe_events, stripe_gateway
from .errors import BillingError
from .models import BillingAccount, CreditGrant, Plan, StripeObject
from .selectors import (
    FEE_PRICE,
    FEE_PRODUCT,
    METER,
    PRICE,
    PRODUCT,
    SUBSCRIPTION_ITEM,
    billable_resources,
    billing_month,
    month_bounds,
    resource_for_price,
    stripe_id_known,
)

logger = logging.getLogger(__name__)

TRANSIENT = stripe_gateway.TRANSIENT


def _remember(*, kind: str, key: str, stripe_id: str) -> str:
    """Store a mapping once; a concurrent writer's first value wins and is returned."""
    with transaction.atomic():
        row, _ = StripeObject.objects.get_or_create(
            kind=kind, key=key, defaults={"stripe_id": stripe_id}
        )
    return row.stripe_id


# Customers and the catalog


def customer_ensure(*, account: BillingAccount) -> str:
    """The organization's Stripe customer id, creating the customer on first use."""
    if account.stripe_customer_id:
        return account.stripe_customer_id
    organization = account.organization
    customer_id = stripe_gateway.customer_create(
        organization_id=organization.pk,
        slug=organization.slug,
        name=organization.name,
        email=account.billing_email,
    )
    with transaction.atomic():
        BillingAccount.objects.filter(pk=account.pk, stripe_customer_id="").update(
            stripe_customer_id=customer_id
        )
        account.stripe_customer_id = BillingAccount.objects.values_list(
            "stripe_customer_id", flat=True
        ).get(pk=account.pk)
    # Events Stripe sent before the id was ours were kept aside as unmatched: apply them now.
    stripe_events.unmatched_events_apply(customer_id=account.stripe_customer_id)
    return account.stripe_customer_id


def resource_ensure(*, resource: str) -> str:
    """A meter, a product and a metered price for one resource; returns the price id."""
    price_id = stripe_id_known(kind=PRICE, key=resource)
    if price_id:
        return price_id
    meter_id = stripe_id_known(kind=METER, key=resource)
    if meter_id is None:
        meter_id = _remember(
            kind=METER, key=resource, stripe_id=stripe_gateway.meter_create(resource=resource)
        )
    product_id = stripe_id_known(kind=PRODUCT, key=resource)
    if product_id is None:
        product_id = _remember(
            kind=PRODUCT, key=resource, stripe_id=stripe_gateway.product_create(resource=resource)
        )
    price_id = stripe_gateway.metered_price_create(
        resource=resource, product_id=product_id, meter_id=meter_id
    )
    return _remember(kind=PRICE, key=resource, stripe_id=price_id)


def fee_price_ensure(*, plan: Plan) -> str | None:
    """A flat monthly price for the plan's fee, or None for a plan without one."""
    if plan.monthly_fee_minor <= 0:
        return None
    key = f"{plan.code}:{plan.monthly_fee_minor}:{settings.BILLING_CURRENCY}"
    price_id = stripe_id_known(kind=FEE_PRICE, key=key)
    if price_id:
        return price_id
    product_id = stripe_id_known(kind=FEE_PRODUCT, key=plan.code)
    if product_id is None:
        product_id = _remember(
            kind=FEE_PRODUCT,
            key=plan.code,
            stripe_id=stripe_gateway.fee_product_create(plan_code=plan.code, plan_name=plan.name),
        )
    price_id = stripe_gateway.fee_price_create(
        plan_code=plan.code, fee_minor=plan.monthly_fee_minor, key=key, product_id=product_id
    )
    return _remember(kind=FEE_PRICE, key=key, stripe_id=price_id)


def catalog_ensure() -> dict[str, str]:
    """Every billable resource's metered price, and every active plan's fee; resource -> price."""
    prices = {resource: resource_ensure(resource=resource) for resource in billable_resources()}
    for plan in Plan.objects.filter(active=True):
        fee_price_ensure(plan=plan)
    return prices


# Subscriptions


def next_month_start(now: datetime) -> datetime:
    return month_bounds(billing_month(now))[1]


def _items_remember(subscription) -> None:
    """Map the subscription's metered items to our resources (the fee item is read live)."""
    for item in stripe_gateway.subscription_items(subscription):
        resource = resource_for_price(item["price"]["id"])
        if resource:
            _remember(
                kind=SUBSCRIPTION_ITEM, key=f"{subscription['id']}:{resource}", stripe_id=item["id"]
            )


def subscription_ensure(*, account: BillingAccount) -> str:
    """A subscription to every metered price and the plan's fee; its id is stored once.

    The billing cycle is anchored to the first of next month (UTC), without prorating the days
    before it, so Stripe's invoice periods are our calendar months. Two creators racing
    (account opening and a plan change, say) get one subscription, the loser an
    IdempotencyError its delivery retries; the plan is then set by `subscription_plan_sync`.
    """
    if account.stripe_subscription_id:
        return account.stripe_subscription_id
    customer_id = customer_ensure(account=account)
    subscription = stripe_gateway.subscription_find(
        customer_id=customer_id, organization_id=account.organization_id
    )
    if subscription is None:
        items = [{"price": price_id} for price_id in catalog_ensure().values()]
        fee = fee_price_ensure(plan=account.plan)
        if fee:
            items.append({"price": fee, "quantity": 1})
        if not items:
            raise BillingError("There is nothing to subscribe to: the price list is empty.")
        subscription = stripe_gateway.subscription_create(
            customer_id=customer_id,
            organization_id=account.organization_id,
            items=items,
            anchor=next_month_start(timezone.now()),
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


def _is_fee(item, fee_prices: set[str]) -> bool:
    price = item["price"]
    return price["id"] in fee_prices or bool(stripe_gateway.metadata(price).get("plan"))


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
        try:
            stripe_gateway.subscription_items_change(
                subscription_id=subscription_id, changes=changes
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
    items = stripe_gateway.subscription_items_list(subscription_id=subscription_id)
    fees = [item for item in items if _is_fee(item, fee_prices)]
    kept = next((item for item in fees if item["price"]["id"] == wanted), None)
    changes: list[dict] = [{"id": item["id"], "deleted": True} for item in fees if item is not kept]
    if wanted and kept is None:
        changes.append({"price": wanted, "quantity": 1})
    return changes


@handler(retry_on=(*TRANSIENT, stripe.IdempotencyError))
def subscription_sync(*, account_id: int) -> None:
    """Owed when an account is opened or changes plan: its customer, subscription and fee.

    Stripe unreachable or failing is tried again later by the outbox, as is a racing creator's
    IdempotencyError (by then it has finished); a refusal gives the message up at once, and
    `subscriptions_ensure_missing` still subscribes an account left without a subscription.
    """
    if not stripe_gateway.configured():
        return
    account = BillingAccount.objects.select_related("organization", "plan").get(pk=account_id)
    subscription_plan_sync(account=account)


def subscriptions_ensure_missing(*, limit: int = 10) -> int:
    """Subscribe accounts still lacking a subscription: those opened before Stripe was
    configured, or whose `subscription_sync` the outbox gave up on. Returns how many.

    Run every few seconds by the push task, so a few at a time (a run stays well inside its
    time limit), in random order (accounts Stripe keeps refusing do not starve the others).
    """
    if not stripe_gateway.configured():
        return 0
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
    item_id = stripe_id_known(kind=SUBSCRIPTION_ITEM, key=key)
    if item_id:
        return item_id
    price_id = resource_ensure(resource=resource)
    item_id = stripe_gateway.subscription_item_create(
        subscription_id=subscription_id, price_id=price_id
    )
    return _remember(kind=SUBSCRIPTION_ITEM, key=key, stripe_id=item_id)


# Credits


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
    transaction_id = stripe_gateway.balance_credit_create(
        customer_id=customer_ensure(account=account),
        amount_minor=grant.remaining_minor,
        currency=grant.currency,
        description=grant.reason,
        credit_grant_id=grant.pk,
    )
    with transaction.atomic():
        moved = CreditGrant.objects.filter(pk=grant.pk, stripe_transaction_id="").update(
            stripe_transaction_id=transaction_id, remaining_minor=0
        )
    if moved:
        grant.stripe_transaction_id, grant.remaining_minor = transaction_id, 0
    else:  # a concurrent push (same idempotency key, same transaction) recorded it first
        grant.refresh_from_db(fields=["stripe_transaction_id", "remaining_minor"])
    return transaction_id


def credit_grants_push(*, limit: int = 100) -> int:
    """Push the unused credits Stripe does not hold yet, of organizations that are customers.

    A credit already used up by built-in invoices (before Stripe was configured) stays ours.
    A grant Stripe refuses is logged and retried on the next run; the others still go. Stripe
    being unavailable stops the run (the next one tries again).
    """
    if not stripe_gateway.configured():
        return 0
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
