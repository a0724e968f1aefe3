"""Writes to billing: the ledger (exactly once per key), accounts and plans, budgets and their
alerts, credits, and the Stripe pages an organization is sent to.

Side effects after a commit (the Stripe subscription's sync, an alert's e-mail) are outbox
messages written in the transaction that owes them.
"""

from __future__ import annotations

import smtplib
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from urllib.parse import unquote, urlsplit

import stripe
from django.conf import settings
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.urls import reverse
from django.utils import timezone

from outbox.services import handler, message_enqueue
from registry.models import StorageAccount
from registry.services.storage_accounts import storage_account_ensure
from tenants.actors import Actor
from tenants.models import ApiKey, Membership, Organization, User
from tenants.scopes import Role
from tenants.services import audit_record
from webhooks.services import event_publish

from . import stripe_gateway, stripe_sync
from .errors import BillingError
from .models import (
    BillingAccount,
    BudgetAlert,
    CreditGrant,
    MeterPush,
    Plan,
    UsageRecord,
    UsageTally,
)
from .money import money_format
from .selectors import (
    billing_month,
    default_plan,
    minor_per_unit,
    month_spends,
    price_at,
    price_table,
)

SYSTEM = Actor()
HOURS_PER_MONTH = Decimal(730)  # storage is priced per GB-month and metered every hour
BYTES_PER_GB = Decimal(10**9)


QUANTITY_STEP = Decimal("0.000001")  # the ledger's quantity precision (6 decimal places)


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
    model_name: str = "",
) -> tuple[UsageRecord, bool]:
    """Price and append one usage row; a second call with the same key returns the first row."""
    row = UsageRecord(
        organization=organization,
        resource=resource,
        quantity=Decimal(quantity),
        unit=unit,
        period_start=period_start,
        period_end=period_end,
        idempotency_key=idempotency_key,
        source_type=source_type,
        source_id=source_id,
        attempt=attempt,
        user=user,
        api_key=api_key,
        labels=labels or {},
        model_name=model_name,
    )
    return usage_record_many(rows=[row])[0]


def usage_record_many(*, rows: list[UsageRecord]) -> list[tuple[UsageRecord, bool]]:
    """Price and append unsaved usage rows in one transaction, each idempotency key once.

    Returns (row, created) per input row: a key already in the ledger (or repeated in `rows`)
    gives the stored row and False. A row's amount is the month's running total, rounded, less
    what the month billed before (see UsageTally). With Stripe configured each row also enters
    the meter-event outbox in the same transaction, so nothing is recorded without being sent
    or sent without being recorded.
    """
    try:
        return _usage_insert(rows)
    except IntegrityError:
        # A concurrent writer stored some of these keys between our check and our insert: the
        # second pass finds them. A row breaking a constraint fails again and raises.
        return _usage_insert(rows)


def _usage_insert(rows: list[UsageRecord]) -> list[tuple[UsageRecord, bool]]:
    keys = [row.idempotency_key for row in rows]
    stored = {u.idempotency_key: u for u in UsageRecord.objects.filter(idempotency_key__in=keys)}
    fresh: dict[str, UsageRecord] = {}
    for row in rows:
        if row.idempotency_key not in stored:
            fresh.setdefault(row.idempotency_key, row)
    if fresh:
        _usage_price_and_insert(list(fresh.values()))
    return [
        (stored[key], False) if key in stored else (fresh[key], fresh[key] is row)
        for key, row in zip(keys, rows, strict=True)
    ]


def _usage_price_and_insert(rows: list[UsageRecord]) -> None:
    prices = price_table(resources={row.resource for row in rows})
    groups = {}
    for row in rows:
        row.pk = None  # a retried batch may carry ids of a rolled-back insert
        row.quantity = Decimal(row.quantity).quantize(QUANTITY_STEP, ROUND_HALF_UP)
        row.unit_price, row.currency = price_at(prices, resource=row.resource, at=row.period_start)
        row.labels = row.labels or {}
        group = (row.organization_id, row.resource, row.currency, billing_month(row.period_end))
        groups[group] = row
    with transaction.atomic():
        UsageTally.objects.bulk_create(
            [
                UsageTally(organization_id=g[0], resource=g[1], currency=g[2], month=g[3])
                for g in groups
            ],
            ignore_conflicts=True,
        )
        wanted = Q()
        for org_id, resource, currency, month in groups:
            wanted |= Q(organization_id=org_id, resource=resource, currency=currency, month=month)
        tallies = {
            (t.organization_id, t.resource, t.currency, t.month): t
            for t in UsageTally.objects.select_for_update().filter(wanted).order_by("pk")
        }
        for row in rows:
            tally = tallies[
                (row.organization_id, row.resource, row.currency, billing_month(row.period_end))
            ]
            tally.exact_minor += row.quantity * row.unit_price * minor_per_unit(row.currency)
            rounded = int(tally.exact_minor.quantize(Decimal(1), ROUND_HALF_UP))
            row.amount_minor = max(rounded - tally.billed_minor, 0)
            tally.billed_minor += row.amount_minor
        UsageRecord.objects.bulk_create(rows)
        UsageTally.objects.bulk_update(tallies.values(), ["exact_minor", "billed_minor"])
        if settings.STRIPE_SECRET_KEY:
            MeterPush.objects.bulk_create(
                MeterPush(
                    usage=row,
                    state=MeterPush.State.PENDING if row.amount_minor else MeterPush.State.SKIPPED,
                )
                for row in rows
            )


def storage_meter(*, hour: datetime, batch: int = 500) -> int:
    """Record one hour of every organization's stored bytes (GB-months); safe to run twice."""
    start = hour.replace(minute=0, second=0, microsecond=0)
    end = start + timedelta(hours=1)
    accounts = StorageAccount.objects.filter(used_bytes__gt=0).order_by("pk")
    rows = [
        UsageRecord(
            organization_id=organization_id,
            resource="storage",
            quantity=Decimal(used_bytes) / BYTES_PER_GB / HOURS_PER_MONTH,
            unit="gb_month",
            period_start=start,
            period_end=end,
            idempotency_key=f"storage:{organization_id}:{start:%Y-%m-%dT%H}",
            source_type="storage",
            source_id=str(organization_id),
            labels={"bytes": str(used_bytes)},
        )
        for organization_id, used_bytes in accounts.values_list("organization_id", "used_bytes")
    ]
    written = 0
    for first in range(0, len(rows), batch):
        written += sum(
            created for _, created in usage_record_many(rows=rows[first : first + batch])
        )
    return written


# Accounts and plans


def _default_plan() -> Plan:
    plan = default_plan()
    if plan.pk is None:  # an operator deactivated every plan: fall back to plain pay as you go
        plan, _ = Plan.objects.get_or_create(code=plan.code, defaults={"name": plan.name})
    return plan


def billing_account_ensure(*, organization: Organization) -> BillingAccount:
    """The organization's account, opened if it has none: the default plan, the plan's storage
    quota and trial credit, and (with Stripe) its customer and subscription owed.

    Run when the organization is created (`organization_created`); writes that need the account
    of an organization made elsewhere (a fixture, the admin) call it too.
    """
    account = BillingAccount.objects.for_organization(organization).select_related("plan").first()
    if account is not None:
        return account
    with transaction.atomic():
        plan = _default_plan()
        BillingAccount.objects.bulk_create(
            [BillingAccount(organization=organization, plan=plan)], ignore_conflicts=True
        )
        account = BillingAccount.objects.for_organization(organization).select_related("plan").get()
        if account.plan_id == plan.pk:
            _plan_apply(account=account, plan=plan)
        if settings.STRIPE_SECRET_KEY:
            # The Stripe customer and subscription, so a plan fee is charged without usage.
            message_enqueue(
                handler=stripe_sync.subscription_sync,
                payload={"account_id": account.pk},
                key=f"billing-account-opened:{account.pk}",
            )
    return account


def _plan_apply(*, account: BillingAccount, plan: Plan) -> None:
    storage = storage_account_ensure(organization=account.organization)
    StorageAccount.objects.filter(pk=storage.pk).update(quota_bytes=plan.storage_quota_bytes)
    if plan.trial_credit_minor:
        credit_grant(
            organization=account.organization,
            amount_minor=plan.trial_credit_minor,
            reason=f"{plan.name} plan credit",
            idempotency_key=f"plan-trial:{account.organization_id}:{plan.code}",
        )


@transaction.atomic
def plan_change(*, organization: Organization, plan: Plan, actor: Actor) -> BillingAccount:
    if not plan.active:
        raise BillingError(
            f"The {plan.name} plan is no longer offered.", fields={"plan": ["Inactive."]}
        )
    account = billing_account_ensure(organization=organization)
    previous = account.plan
    account.plan = plan
    account.save(update_fields=["plan"])
    _plan_apply(account=account, plan=plan)
    audit_record(
        organization=organization,
        actor=actor,
        action="billing.plan_changed",
        target=account,
        data={"from": previous.code, "to": plan.code},
    )
    if settings.STRIPE_SECRET_KEY:
        # The subscription's fee item follows the plan.
        message_enqueue(handler=stripe_sync.subscription_sync, payload={"account_id": account.pk})
    return account


@transaction.atomic
def budget_set(
    *,
    organization: Organization,
    actor: Actor,
    monthly_budget_minor: int | None,
    thresholds: list[int],
    hard_cap: bool,
    billing_email: str | None = None,
) -> BillingAccount:
    if monthly_budget_minor is not None and monthly_budget_minor < 0:
        raise BillingError("A budget cannot be negative.", fields={"monthly_budget": ["≥ 0."]})
    if hard_cap and monthly_budget_minor is None:
        raise BillingError(
            "A hard cap needs a monthly budget; set one or turn the cap off.",
            fields={"hard_cap": ["Needs a monthly budget."]},
        )
    if any(not isinstance(t, int) or isinstance(t, bool) or not 1 <= t <= 1000 for t in thresholds):
        raise BillingError(
            "Alert thresholds are whole percentages between 1 and 1000.",
            fields={"thresholds": ["Whole numbers from 1 to 1000, e.g. 50, 80, 100."]},
        )
    account = billing_account_ensure(organization=organization)
    account.monthly_budget_minor = monthly_budget_minor
    account.budget_thresholds = sorted(set(thresholds))
    account.budget_hard_cap = hard_cap
    fields = ["monthly_budget_minor", "budget_thresholds", "budget_hard_cap"]
    if billing_email is not None:
        account.billing_email = billing_email
        fields.append("billing_email")
    account.save(update_fields=fields)
    audit_record(
        organization=organization,
        actor=actor,
        action="billing.budget_set",
        target=account,
        data={
            "monthly_budget_minor": monthly_budget_minor,
            "thresholds": account.budget_thresholds,
            "hard_cap": hard_cap,
        },
    )
    return account


def budget_alerts_check(*, now: datetime | None = None) -> int:
    """Raise each threshold a budget crossed this month once: alert row, audit event, email."""
    now = now or timezone.now()
    month = billing_month(now)
    sent = 0
    accounts = BillingAccount.objects.filter(monthly_budget_minor__gt=0).select_related(
        "organization"
    )
    accounts = list(accounts)
    spends = month_spends(organization_ids=[a.organization_id for a in accounts], at=now)
    for account in accounts:
        spend = spends.get(account.organization_id, 0)
        budget = account.monthly_budget_minor
        for threshold in sorted(account.budget_thresholds or []):
            if spend * 100 < budget * threshold:
                break
            sent += _budget_alert(account=account, month=month, threshold=threshold, spend=spend)
    return sent


def _budget_alert(*, account: BillingAccount, month, threshold: int, spend: int) -> bool:
    organization = account.organization
    with transaction.atomic():
        alert, created = BudgetAlert.objects.get_or_create(
            organization=organization,
            month=month,
            threshold=threshold,
            defaults={"budget_minor": account.monthly_budget_minor, "spend_minor": spend},
        )
        if not created:
            return False
        audit_record(
            organization=organization,
            actor=SYSTEM,
            action="billing.budget_alert",
            target=alert,
            data={"threshold": threshold, "spend_minor": spend},
        )
        message_enqueue(
            handler=budget_alert_mail,
            payload={"alert_id": alert.pk},
            key=f"budget-alert:{alert.pk}",
        )
        event_publish(
            organization=organization,
            type="billing.budget_threshold_reached",
            data={
                "month": str(month),
                "threshold_percent": threshold,
                "budget_minor": alert.budget_minor,
                "spend_minor": spend,
                "currency": settings.BILLING_CURRENCY,
                "hard_cap": account.budget_hard_cap,
            },
        )
    return True


@handler(retry_on=(OSError, smtplib.SMTPException))
def budget_alert_mail(*, alert_id: int) -> None:
    """E-mail a crossed threshold to the billing contacts; an SMTP failure raises, so the outbox
    sends it again later."""
    alert = BudgetAlert.objects.select_related("organization").get(pk=alert_id)
    organization = alert.organization
    account = BillingAccount.objects.for_organization(organization).get()
    recipients = _billing_recipients(account)
    if not recipients:
        return
    currency = settings.BILLING_CURRENCY
    subject = f"{organization.name}: {alert.threshold}% of this month's budget used"
    body = (
        f"{organization.name} has spent {money_format(alert.spend_minor, currency)} of its "
        f"{money_format(alert.budget_minor, currency)} monthly budget ({alert.threshold}%)."
    )
    if account.budget_hard_cap and alert.threshold >= 100:
        body += " The hard cap is on: new jobs wait until the budget is raised or next month."
    send_mail(subject, body, None, recipients)


def _billing_recipients(account: BillingAccount) -> list[str]:
    if account.billing_email:
        return [account.billing_email]
    return list(
        Membership.objects.for_organization(account.organization)
        .filter(role__in=[Role.OWNER, Role.BILLING])
        .values_list("user__email", flat=True)
    )


# Credits


def credit_grant(
    *,
    organization: Organization,
    amount_minor: int,
    reason: str,
    granted_by: User | None = None,
    expires_at: datetime | None = None,
    idempotency_key: str | None = None,
) -> tuple[CreditGrant, bool]:
    if not isinstance(amount_minor, int) or amount_minor <= 0:
        raise BillingError("A credit is a positive amount.", fields={"amount": ["> 0."]})
    key = idempotency_key or f"grant:{organization.pk}:{timezone.now().isoformat()}:{reason}"
    with transaction.atomic():
        grant, created = CreditGrant.objects.get_or_create(
            idempotency_key=key,
            defaults={
                "organization": organization,
                "amount_minor": amount_minor,
                "remaining_minor": amount_minor,
                "currency": settings.BILLING_CURRENCY,
                "reason": reason,
                "granted_by": granted_by,
                "expires_at": expires_at,
            },
        )
        if created:
            audit_record(
                organization=organization,
                actor=Actor(user=granted_by),
                action="billing.credit_granted",
                target=grant,
                data={"amount_minor": amount_minor, "reason": reason},
            )
    return grant, created


def plan_credits_grant(*, at: datetime | None = None) -> int:
    """Give every account its plan's included credits for the month of `at` (once per month)."""
    month = billing_month(at or timezone.now())
    granted = 0
    accounts = BillingAccount.objects.filter(plan__included_credit_minor__gt=0).select_related(
        "organization", "plan"
    )
    for account in accounts.iterator():
        _, created = credit_grant(
            organization=account.organization,
            amount_minor=account.plan.included_credit_minor,
            reason=f"{account.plan.name} plan, {month:%B %Y}",
            idempotency_key=f"plan-month:{account.organization_id}:{month:%Y-%m}",
        )
        granted += created
    return granted


@transaction.atomic
def credits_apply(*, organization: Organization, amount_minor: int, at: datetime) -> int:
    """Consume up to `amount_minor` of credits held at `at`, soonest expiry first.

    Returns what was applied. Credits granted after `at` (e.g. next month's plan credit, when a
    month's invoice is issued late) are left for later.
    """
    left = amount_minor
    grants = (
        CreditGrant.objects.for_organization(organization)
        .select_for_update()
        .filter(remaining_minor__gt=0, created_at__lt=at)
        .exclude(expires_at__lte=at)
        .order_by(F("expires_at").asc(nulls_last=True), "created_at", "pk")
    )
    for grant in grants:
        if left <= 0:
            break
        take = min(grant.remaining_minor, left)
        CreditGrant.objects.filter(pk=grant.pk).update(remaining_minor=F("remaining_minor") - take)
        left -= take
    return amount_minor - left


# Stripe-hosted pages


def billing_page_address(organization: Organization) -> str:
    return settings.SITE_URL.rstrip("/") + reverse("billing:billing", args=[organization.slug])


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _site_address_check(address: str, *, field: str) -> str:
    """`address` when it lies on this site: the scheme, host and port of `SITE_URL`, and under
    its path. Anything else (another host, a look-alike, a user@host, a scheme-relative or
    script address) is refused with a 400 naming the field, so Stripe's genuine pages never
    send the browser elsewhere."""
    site = urlsplit(settings.SITE_URL)
    prefix = site.path.rstrip("/") + "/"
    refusal = BillingError(
        f"{field} must be an address on this site, under {site.scheme}://{site.netloc}{prefix}",
        fields={field: [f"Must start with {site.scheme}://{site.netloc}{prefix}"]},
    )
    # Browsers drop tabs and newlines and read a backslash as a slash: what they would follow
    # is not what we would check.
    if any(char.isspace() or not char.isprintable() or char == "\\" for char in address):
        raise refusal
    try:
        parts = urlsplit(address)
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError:
        raise refusal from None
    same_origin = (parts.scheme.lower(), parts.hostname, port) == (
        site.scheme.lower(),
        site.hostname,
        site.port or _DEFAULT_PORTS.get(site.scheme.lower()),
    )
    path = parts.path or "/"
    if (
        not same_origin
        or parts.username is not None
        or parts.password is not None
        or not (path if path.endswith("/") else path + "/").startswith(prefix)
        or any(segment in {".", ".."} for segment in unquote(path).split("/"))
    ):
        raise refusal
    return address


def checkout_session_create(
    *, organization: Organization, success_url: str | None = None, cancel_url: str | None = None
) -> str:
    """A Checkout page (setup mode) where the organization saves a payment method; returns its
    address. The browser comes back to the billing page unless told another page of this site.
    """
    back = billing_page_address(organization)
    success_url = _site_address_check(success_url or back, field="success_url")
    cancel_url = _site_address_check(cancel_url or back, field="cancel_url")
    stripe_gateway.client()  # not configured: say so before anything is written
    account = billing_account_ensure(organization=organization)
    try:
        return stripe_gateway.checkout_session_create(
            customer_id=stripe_sync.customer_ensure(account=account),
            organization_id=organization.pk,
            success_url=success_url,
            cancel_url=cancel_url,
        )
    except stripe.StripeError as error:
        raise stripe_gateway.unavailable(error) from error


def portal_session_create(*, organization: Organization, return_url: str | None = None) -> str:
    """A Billing Portal page (payment methods, invoices, billing details); returns its address."""
    return_url = _site_address_check(
        return_url or billing_page_address(organization), field="return_url"
    )
    stripe_gateway.client()
    account = billing_account_ensure(organization=organization)
    try:
        return stripe_gateway.portal_session_create(
            customer_id=stripe_sync.customer_ensure(account=account), return_url=return_url
        )
    except stripe.StripeError as error:
        raise stripe_gateway.unavailable(error) from error
