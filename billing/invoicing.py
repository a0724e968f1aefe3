"""Invoices of the built-in ledger (when Stripe is not configured): issuing, payment, reading."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Sum
from django.db.models.functions import Length
from django.db.models.query import QuerySet
from django.utils import timezone

from tenants.actors import Actor
from tenants.models import Organization
from tenants.services import audit_record

from .errors import BillingError
from .models import BillingAccount, Invoice, InvoiceLine, UsageRecord
from .selectors import month_bounds
from .services import billing_account_ensure, credits_apply
from .stripe_events import invoice_event_publish

logger = logging.getLogger(__name__)

SYSTEM = Actor()
NUMBER_PREFIX = "FS"
NUMBER_DIGITS = 6
TAX_RESOURCE = "tax"  # marks the tax line; every other line is a charge in the subtotal
# pg_advisory_xact_lock key: numbering is one sequence across organizations, so issuing is
# serialized; SQLite (make run) serializes writers with its immediate transactions instead.
NUMBER_LOCK_KEY = 0x66735F696E76  # "fs_inv"


# Issuing


def invoices_issue(*, month: date) -> int:
    """Issue the month's invoice to every organization with usage or a plan fee; returns how many.

    An invoice bills the ledger rows recorded in its month (`created_at`), so every row lands on
    exactly one invoice even when it is recorded after its usage's month was invoiced.

    Safe to run again: an organization already invoiced for the month is skipped, and its credits
    are consumed in the transaction that inserts the invoice, so never twice. With Stripe
    configured, Stripe issues the invoices and this does nothing.
    """
    if settings.STRIPE_SECRET_KEY:
        return 0
    start, end = month_bounds(month)
    with_usage = set(
        UsageRecord.objects.filter(created_at__gte=start, created_at__lt=end)
        .values_list("organization_id", flat=True)
        .distinct()
    )
    with_fee = set(
        BillingAccount.objects.filter(
            plan__monthly_fee_minor__gt=0, created_at__lt=end
        ).values_list("organization_id", flat=True)
    )
    issued = 0
    for organization in Organization.objects.filter(pk__in=with_usage | with_fee).order_by("pk"):
        try:
            issued += invoice_issue(organization=organization, month=month) is not None
        except BillingError as error:  # one organization's bad data must not hold up the rest
            logger.error("invoice for %s, %s not issued: %s", organization.slug, month, error)
    return issued


def invoice_issue(*, organization: Organization, month: date) -> Invoice | None:
    """One organization's invoice for `month`, or None when it already has one."""
    start, end = month_bounds(month)
    try:
        with transaction.atomic():
            _number_lock()
            existing = Invoice.objects.for_organization(organization).filter(
                source=Invoice.Source.BUILTIN, period_start=start
            )
            if existing.exists():
                return None
            return _invoice_create(organization=organization, month=month, start=start, end=end)
    except IntegrityError:
        # A concurrent run invoiced the organization first (where no lock serialized us).
        if (
            Invoice.objects.for_organization(organization)
            .filter(source=Invoice.Source.BUILTIN, period_start=start)
            .exists()
        ):
            return None
        raise


def _number_lock() -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [NUMBER_LOCK_KEY])


def _next_number(*, year: int) -> str:
    """The year's next number; call it under the number lock, in the inserting transaction."""
    prefix = f"{NUMBER_PREFIX}-{year}-"
    # Numbers are one sequence across organizations, so this reads past the tenant filter.
    last = (
        Invoice.objects.filter(source=Invoice.Source.BUILTIN, number__startswith=prefix)
        .order_by(Length("number").desc(), "-number")
        .values_list("number", flat=True)
        .first()
    )
    sequence = int(last.removeprefix(prefix)) + 1 if last else 1
    return f"{prefix}{sequence:0{NUMBER_DIGITS}d}"


def _invoice_create(
    *, organization: Organization, month: date, start: datetime, end: datetime
) -> Invoice | None:
    account = billing_account_ensure(organization=organization)
    currency = settings.BILLING_CURRENCY
    usage = list(
        # Rows recorded in the month: a late row (an attempt reaped after the month was
        # invoiced, say) goes on the next invoice instead of on none.
        UsageRecord.objects.for_organization(organization)
        .filter(created_at__gte=start, created_at__lt=end)
        .values("resource", "unit", "currency")
        .annotate(quantity=Sum("quantity"), amount=Sum("amount_minor"))
        .order_by("resource", "unit", "currency")
    )
    other = {row["currency"] for row in usage} - {currency}
    if other:
        raise BillingError(
            f"Usage in {', '.join(sorted(other))} cannot go on a {currency} invoice.",
            fields={"currency": sorted(other)},
        )
    lines = [
        InvoiceLine(
            description=resource_label(row["resource"]),
            resource=row["resource"],
            quantity=row["quantity"],
            unit=row["unit"],
            amount_minor=row["amount"],
        )
        for row in usage
    ]
    fee = account.plan.monthly_fee_minor
    if fee and account.created_at < end:
        lines.append(
            InvoiceLine(
                description=f"{account.plan.name} plan, {month:%B %Y}",
                resource=f"plan:{account.plan.code}",
                quantity=Decimal(1),
                unit="month",
                amount_minor=fee,
            )
        )
    if not lines:
        return None
    subtotal = sum(line.amount_minor for line in lines)
    credits = (
        credits_apply(organization=organization, amount_minor=subtotal, at=end) if subtotal else 0
    )
    rate = account.tax_rate_percent
    tax = int(((subtotal - credits) * rate / 100).quantize(Decimal(1), ROUND_HALF_UP))
    if rate:
        lines.append(
            InvoiceLine(
                description=f"Tax at {rate.normalize():f}%",
                resource=TAX_RESOURCE,
                quantity=rate,
                unit="percent",
                amount_minor=tax,
            )
        )
    now = timezone.now()
    invoice = Invoice.objects.create(
        organization=organization,
        number=_next_number(year=now.year),
        source=Invoice.Source.BUILTIN,
        status=Invoice.Status.OPEN,
        currency=currency,
        period_start=start,
        period_end=end,
        subtotal_minor=subtotal,
        credits_minor=credits,
        tax_minor=tax,
        total_minor=subtotal - credits + tax,
        issued_at=now,
    )
    for line in lines:
        line.invoice = invoice
    InvoiceLine.objects.bulk_create(lines)
    audit_record(
        organization=organization,
        actor=SYSTEM,
        action="billing.invoice_issued",
        target=invoice,
        data={
            "number": invoice.number,
            "month": f"{month:%Y-%m}",
            "subtotal_minor": subtotal,
            "credits_minor": credits,
            "tax_minor": tax,
            "total_minor": invoice.total_minor,
        },
    )
    return invoice


@transaction.atomic
def invoice_mark_paid(
    *, invoice: Invoice, actor: Actor, paid_at: datetime | None = None
) -> Invoice:
    """An operator records a built-in invoice as paid (a transfer arrived); Stripe's pay itself."""
    invoice = Invoice.objects.select_for_update().get(pk=invoice.pk)
    if invoice.source != Invoice.Source.BUILTIN:
        raise BillingError("Stripe invoices are marked paid by Stripe, not here.")
    if invoice.status != Invoice.Status.OPEN:
        raise BillingError(
            f"Invoice {invoice.number} is {invoice.get_status_display().lower()}, not open.",
            fields={"status": [invoice.status]},
        )
    invoice.status = Invoice.Status.PAID
    invoice.paid_at = paid_at or timezone.now()
    invoice.save(update_fields=["status", "paid_at"])
    audit_record(
        organization=invoice.organization,
        actor=actor,
        action="billing.invoice_paid",
        target=invoice,
        data={"number": invoice.number, "total_minor": invoice.total_minor},
    )
    invoice_event_publish(invoice=invoice, type="invoice.paid")
    return invoice


# Reading


def resource_label(resource: str) -> str:
    kind, _, name = resource.partition(":")
    if kind == "gpu" and name:
        return f"GPU time, {name}"
    if resource == "storage":
        return "Storage"
    return resource


def invoice_list(*, organization: Organization) -> QuerySet[Invoice]:
    return Invoice.objects.for_organization(organization)


@dataclass(frozen=True)
class StatementRow:
    description: str
    quantity: str
    unit: str
    amount_minor: int


@dataclass(frozen=True)
class Statement:
    """An invoice laid out for reading: its charges, then the tax lines below the subtotal."""

    invoice: Invoice
    charges: list[StatementRow]
    taxes: list[StatementRow]

    @property
    def first_day(self) -> date:
        return self.invoice.period_start.astimezone(UTC).date()

    @property
    def last_day(self) -> date:
        """The period's end is exclusive (midnight after its last day)."""
        return (self.invoice.period_end - timedelta(seconds=1)).astimezone(UTC).date()


def quantity_text(quantity: Decimal) -> str:
    """A quantity without trailing zeros and with thousands separators: 3600.000000 -> 3,600."""
    quantity = Decimal(quantity)
    if quantity == quantity.to_integral_value():
        return f"{quantity.quantize(Decimal(1)):,f}"
    return f"{quantity.normalize():,f}"


def invoice_statement(*, invoice: Invoice) -> Statement:
    charges, taxes = [], []
    for line in invoice.lines.all():
        if line.resource == TAX_RESOURCE:  # the rate is in the description
            taxes.append(StatementRow(line.description, "", "", line.amount_minor))
            continue
        quantity = quantity_text(line.quantity) if line.unit else ""
        charges.append(StatementRow(line.description, quantity, line.unit, line.amount_minor))
    return Statement(invoice=invoice, charges=charges, taxes=taxes)
