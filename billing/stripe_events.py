"""Stripe's events, as the webhook view hands them over verified: store each once, mirror
invoices, and derive the organization's payment standing.

Stripe delivers events at least once and in any order. Each event id is stored in the same
transaction as its effect, so a redelivery has none. An invoice is only ever replaced by a
snapshot from a later event (ties broken by a fixed order), a paid or void invoice never moves
back, and the organization's standing is recomputed from the mirrored invoices, so any order of
the same events ends in the same state.

An event for a customer we do not know yet is kept unapplied, marked unmatched, and applied when
`stripe_sync.customer_ensure` stores that customer's id (a redelivery is a duplicate, as it
would be anyway: Stripe retries only what was not answered with a 2xx).

Follow-up work that calls Stripe is owed through the outbox in the transaction that stores the
event, so the answer to Stripe never waits on (or fails with) the broker or Stripe itself.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from django.db import IntegrityError, transaction

from outbox.services import handler, message_enqueue
from tenants.actors import Actor
from tenants.models import Organization
from tenants.services import audit_record, organization_status_set
from webhooks.services import event_publish

from . import stripe_gateway
from .models import BillingAccount, Invoice, InvoiceLine, WebhookEvent
from .selectors import resource_for_price

logger = logging.getLogger(__name__)

SYSTEM = Actor()

INVOICE_EVENTS = {
    "invoice.created",
    "invoice.finalized",
    "invoice.updated",
    "invoice.paid",
    "invoice.payment_failed",
    "invoice.voided",
    "invoice.marked_uncollectible",
}
# How far along an invoice is; between snapshots of the same second the further one wins.
STATUS_RANK = {
    Invoice.Status.DRAFT: 0,
    Invoice.Status.OPEN: 1,
    Invoice.Status.UNCOLLECTIBLE: 2,
    Invoice.Status.PAID: 3,
    Invoice.Status.VOID: 3,
}
FINAL = {Invoice.Status.PAID, Invoice.Status.VOID}
OWING = [Invoice.Status.OPEN, Invoice.Status.UNCOLLECTIBLE]
UNMATCHED = "unmatched: unknown customer "


def _unmatched(customer_id: str | None) -> str:
    return f"{UNMATCHED}{customer_id or ''}"


def event_receive(*, payload: dict) -> tuple[WebhookEvent, bool]:
    """Store and apply one verified event exactly once; returns it and whether it was known."""
    created = datetime.fromtimestamp(int(payload["created"]), tz=UTC)
    data = (payload.get("data") or {}).get("object") or {}
    object_id = data.get("id") if isinstance(data, dict) else None
    with transaction.atomic():
        try:
            with transaction.atomic():
                stored = WebhookEvent.objects.create(
                    event_id=payload["id"],
                    type=str(payload.get("type", ""))[:100],
                    object_id=str(object_id or "")[:100],
                    created=created,
                    payload=payload,
                )
        except IntegrityError:
            # Delivered before (a concurrent copy waits on the unique index, then lands here).
            return WebhookEvent.objects.get(event_id=payload["id"]), True
        _apply_stored(stored)
    return stored, False


def _apply_stored(stored: WebhookEvent) -> None:
    """Apply a stored event and record the outcome; an unmatched one stays unprocessed."""
    try:
        with transaction.atomic():
            stored.error = _apply(payload=stored.payload, created=stored.created)
    except IntegrityError as error:
        # The mirror contradicts a constraint (say, an invoice number the ledger used):
        # a redelivery would meet it again, so keep the event and show the error.
        logger.exception("stripe webhook %s not applied", stored.event_id)
        stored.error = f"not applied: {error}"[:2000]
    if not stored.error.startswith(UNMATCHED):
        stored.processed_at = datetime.now(tz=UTC)
    stored.save(update_fields=["error", "processed_at"])


def unmatched_events_apply(*, customer_id: str) -> int:
    """Apply the events kept aside for a customer before its id was ours; returns how many
    were applied. Called once the id is stored; safe to call again (each event is claimed)."""
    if not customer_id:
        return 0
    marker = _unmatched(customer_id)
    waiting = list(
        WebhookEvent.objects.filter(processed_at__isnull=True, error=marker)
        .order_by("created", "pk")
        .values_list("pk", flat=True)
    )
    applied = 0
    for pk in waiting:
        with transaction.atomic():
            stored = (
                WebhookEvent.objects.select_for_update()
                .filter(pk=pk, processed_at__isnull=True, error=marker)
                .first()
            )
            if stored is None:  # applied by a concurrent call
                continue
            _apply_stored(stored)
            applied += not stored.error
    return applied


def _apply(*, payload: dict, created: datetime) -> str:
    """The event's effect; returns an error to store ("" when applied or not of interest)."""
    if payload.get("type") == "checkout.session.completed":
        return _checkout_completed(payload=payload)
    if payload.get("type") not in INVOICE_EVENTS:
        return ""
    data = (payload.get("data") or {}).get("object") or {}
    customer_id = data.get("customer")
    if isinstance(customer_id, dict):
        customer_id = customer_id.get("id")
    account = (
        BillingAccount.objects.select_for_update()
        .select_related("organization")
        .filter(stripe_customer_id=customer_id or "")
        .first()
    )
    if not data.get("id"):
        return "an invoice event without an invoice id"
    if account is None:
        logger.warning("stripe webhook %s: unknown customer %r", payload.get("id"), customer_id)
        return _unmatched(customer_id)
    was = Invoice.objects.filter(stripe_id=data["id"]).values_list("status", flat=True).first()
    invoice = invoice_mirror(account=account, event=payload, created=created)
    standing_update(account=account)
    if invoice is not None and invoice.pk is not None:
        if invoice.status == Invoice.Status.PAID and was != Invoice.Status.PAID:
            invoice_event_publish(invoice=invoice, type="invoice.paid")
        # Each failed charge is its own Stripe event (stored once): each is worth telling.
        elif payload["type"] == "invoice.payment_failed" and invoice.status not in FINAL:
            invoice_event_publish(invoice=invoice, type="invoice.payment_failed")
    return ""


def invoice_event_publish(*, invoice: Invoice, type: str) -> None:
    """Owe `invoice.paid` / `invoice.payment_failed` to the organization's webhooks (Stripe's
    mirrored invoices here, the built-in ledger's from billing.invoicing)."""
    event_publish(
        organization=invoice.organization,
        type=type,
        data={
            "invoice": {
                "id": invoice.pk,
                "number": invoice.number,
                "source": invoice.source,
                "status": invoice.status,
                "currency": invoice.currency,
                "total_minor": invoice.total_minor,
                "period_start": invoice.period_start.isoformat(),
                "period_end": invoice.period_end.isoformat(),
                "paid_at": invoice.paid_at.isoformat() if invoice.paid_at else None,
                "hosted_url": invoice.hosted_url,
            }
        },
    )


def _checkout_completed(*, payload: dict) -> str:
    """A payment method saved through Checkout becomes the one invoices are charged to."""
    session = (payload.get("data") or {}).get("object") or {}
    customer_id, setup_intent = session.get("customer"), session.get("setup_intent")
    if session.get("mode") != "setup" or not setup_intent:
        return ""
    if not BillingAccount.objects.filter(stripe_customer_id=customer_id or "").exists():
        return _unmatched(customer_id)
    # Two Stripe calls: owed with the event, made after the commit by the outbox.
    message_enqueue(
        handler=payment_method_default,
        payload={"customer_id": customer_id, "setup_intent_id": setup_intent},
        key=f"stripe-setup-intent:{setup_intent}:default",
    )
    return ""


@handler(retry_on=stripe_gateway.TRANSIENT)
def payment_method_default(*, customer_id: str, setup_intent_id: str) -> None:
    """After Checkout saved a payment method: make it the customer's default for invoices
    (setting the same default again changes nothing, so a repeat is harmless)."""
    stripe_gateway.default_payment_method_set(
        customer_id=customer_id, setup_intent_id=setup_intent_id
    )


def _order_key(event: dict) -> tuple:
    status = (event.get("data") or {}).get("object", {}).get("status") or Invoice.Status.DRAFT
    return (int(event["created"]), STATUS_RANK.get(status, 0), event["id"])


def _last_applied_key(*, stripe_id: str, created: datetime, event_id: str) -> tuple | None:
    """The highest order key among the other events of the same second for this invoice."""
    events = (
        WebhookEvent.objects.filter(
            created=created, type__in=INVOICE_EVENTS, error="", object_id=stripe_id
        )
        .exclude(event_id=event_id)
        .values_list("payload", flat=True)
    )
    keys = [_order_key(event) for event in events]
    return max(keys) if keys else None


def invoice_mirror(*, account: BillingAccount, event: dict, created: datetime) -> Invoice | None:
    """Apply the event's invoice snapshot if it is newer than the one held."""
    data = event["data"]["object"]
    status = data.get("status") or Invoice.Status.DRAFT
    if status not in STATUS_RANK:
        return None
    invoice = Invoice.objects.select_for_update().filter(stripe_id=data["id"]).first()
    if invoice is not None:
        if invoice.status in FINAL and status != invoice.status:
            return invoice
        if invoice.stripe_updated and created < invoice.stripe_updated:
            return invoice
        if invoice.stripe_updated == created:
            held = _last_applied_key(stripe_id=data["id"], created=created, event_id=event["id"])
            if held is not None and _order_key(event) <= held:
                return invoice
    else:
        invoice = Invoice(
            organization=account.organization, source=Invoice.Source.STRIPE, stripe_id=data["id"]
        )
    _snapshot_apply(invoice=invoice, data=data, status=status, created=created)
    return invoice


def _ts(value) -> datetime | None:
    return datetime.fromtimestamp(int(value), tz=UTC) if value else None


def _snapshot_apply(*, invoice: Invoice, data: dict, status: str, created: datetime) -> None:
    lines = ((data.get("lines") or {}).get("data")) or []
    starts = [line["period"]["start"] for line in lines if line.get("period")]
    ends = [line["period"]["end"] for line in lines if line.get("period")]
    subtotal = int(data.get("subtotal") or 0)
    total = int(data.get("total") or 0)
    discounts = sum(int(d.get("amount") or 0) for d in data.get("total_discount_amounts") or [])
    taxes = data.get("total_taxes")
    tax = (
        sum(int(t.get("amount") or 0) for t in taxes)
        if taxes is not None
        else int(data.get("tax") or 0)
    )
    amount_due = int(data.get("amount_due", total) or 0)
    balance_applied = max(0, total - amount_due)
    transitions = data.get("status_transitions") or {}
    invoice.number = data.get("number") or ""
    invoice.status = status
    invoice.currency = (data.get("currency") or invoice.currency)[:3]
    invoice.period_start = _ts(min(starts) if starts else data.get("period_start")) or created
    invoice.period_end = _ts(max(ends) if ends else data.get("period_end")) or created
    invoice.subtotal_minor = max(0, subtotal)
    invoice.credits_minor = max(0, discounts + balance_applied)
    invoice.tax_minor = max(0, tax)
    invoice.total_minor = max(0, amount_due)
    invoice.hosted_url = data.get("hosted_invoice_url") or ""
    invoice.pdf_url = data.get("invoice_pdf") or ""
    invoice.issued_at = _ts(transitions.get("finalized_at"))
    invoice.paid_at = _ts(transitions.get("paid_at")) if status == Invoice.Status.PAID else None
    invoice.stripe_updated = created
    invoice.save()
    invoice.lines.all().delete()
    InvoiceLine.objects.bulk_create(
        [
            InvoiceLine(
                invoice=invoice,
                description=(line.get("description") or "")[:300],
                resource=resource_for_price(_line_price(line)),
                quantity=line.get("quantity") or 0,
                unit="minor_unit" if _line_price(line) else "",
                amount_minor=int(line.get("amount") or 0),
            )
            for line in lines
        ]
        + (
            [InvoiceLine(invoice=invoice, description="Tax", resource="tax", amount_minor=tax)]
            if tax
            else []
        )
    )


def _line_price(line: dict) -> str:
    price = ((line.get("pricing") or {}).get("price_details") or {}).get("price")
    if price is None:
        price = line.get("price")
    if isinstance(price, dict):
        price = price.get("id")
    return price or ""


def standing_update(*, account: BillingAccount) -> None:
    """Past due while a mirrored invoice whose payment failed is still owed; else restored.

    Derived from the invoices, not from the last event, so the order of delivery does not matter.
    """
    owing = list(
        Invoice.objects.for_organization(account.organization)
        .filter(source=Invoice.Source.STRIPE, status__in=OWING)
        .values_list("stripe_id", flat=True)
    )
    failures = (
        WebhookEvent.objects.filter(
            # Stored events are applied in the transaction that stores them (this one's too).
            type="invoice.payment_failed",
            error="",
            object_id__in=owing,
        )
        .order_by("created")
        .values_list("created", flat=True)
        if owing
        else []
    )
    first_failure = next(iter(failures), None)
    if first_failure is not None:
        past_due_set(account=account, since=first_failure)
    elif account.past_due_since is not None:
        past_due_clear(account=account)


@transaction.atomic
def past_due_set(*, account: BillingAccount, since: datetime) -> None:
    """Past due since `since` (the earliest failed payment still owed); the grace runs from it.

    Only an active organization becomes past due: an operator's suspension stays as it is.
    """
    if account.past_due_since != since:
        account.past_due_since = since
        account.save(update_fields=["past_due_since"])
    organization = account.organization
    if organization_status_set(
        organization=organization,
        status=Organization.Status.PAST_DUE,
        actor=SYSTEM,
        reason=f"payment failed on {since.isoformat()} and is still owed",
        only_from=[Organization.Status.ACTIVE],
    ):
        audit_record(
            organization=organization,
            actor=SYSTEM,
            action="billing.past_due",
            target=account,
            data={"since": since.isoformat()},
        )


@transaction.atomic
def past_due_clear(*, account: BillingAccount) -> None:
    """Nothing failed is owed any more: a past-due organization is active again (a suspended
    one stays suspended)."""
    if account.past_due_since is not None:
        account.past_due_since = None
        account.save(update_fields=["past_due_since"])
    organization = account.organization
    if organization_status_set(
        organization=organization,
        status=Organization.Status.ACTIVE,
        actor=SYSTEM,
        reason="no failed payment is owed any more",
        only_from=[Organization.Status.PAST_DUE],
    ):
        audit_record(
            organization=organization, actor=SYSTEM, action="billing.restored", target=account
        )
