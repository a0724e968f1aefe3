"""Reads of accounts, prices, spend and budgets, for jobs (placement, fair share), pages and
reports. A selector never writes."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db.models import (
    CharField,
    Count,
    F,
    Max,
    Min,
    Q,
    QuerySet,
    Subquery,
    Sum,
    Value,
)
from django.db.models.functions import Concat
from django.utils import timezone

from tenants.compiled import CompiledRows
from tenants.models import Organization
from tenants.standing import Restriction, budget_reached, payment_past_due

from .models import (
    BillingAccount,
    BudgetAlert,
    CreditGrant,
    MeterPush,
    Plan,
    Price,
    Reconciliation,
    StripeObject,
    UsageRecord,
    UsageTally,
)

MINOR_UNITS = {"usd": 100, "eur": 100, "gbp": 100, "jpy": 1}


# Kinds of StripeObject: which Stripe object stands for one of ours.
METER = "meter"
PRODUCT = "product"
PRICE = "price"
FEE_PRODUCT = "fee_product"
FEE_PRICE = "fee_price"
SUBSCRIPTION_ITEM = "subscription_item"


def minor_per_unit(currency: str) -> int:
    return MINOR_UNITS.get(currency.lower(), 100)


def billing_month(at: datetime) -> date:
    """The calendar month (UTC) that usage ending at `at` is billed in, as its first day."""
    at = at.astimezone(UTC)
    return date(at.year, at.month, 1)


def month_bounds(month: date) -> tuple[datetime, datetime]:
    start = datetime(month.year, month.month, 1, tzinfo=UTC)
    following = date(month.year + month.month // 12, month.month % 12 + 1, 1)
    return start, datetime(following.year, following.month, 1, tzinfo=UTC)


def price_table(*, resources: set[str]) -> dict[str, list[Price]]:
    """Each resource's prices, newest first, for pricing many rows with one query."""
    table: dict[str, list[Price]] = defaultdict(list)
    for price in Price.objects.filter(resource__in=resources).order_by("-effective_from"):
        table[price.resource].append(price)
    return table


def price_at(table: dict[str, list[Price]], *, resource: str, at: datetime) -> tuple[Decimal, str]:
    """The unit price in force at `at`; a resource with no price yet gets the default."""
    for price in table.get(resource, ()):
        if price.effective_from <= at:
            return price.unit_price, price.currency
    return Decimal(settings.DEFAULT_GPU_SECOND_PRICE), settings.BILLING_CURRENCY


def _prices_in_force(*, resource, at) -> QuerySet:
    """The prices of `resource` that started by `at`, newest first: price_at's answer is the
    first (either argument may be an expression of an outer query)."""
    return Price.objects.filter(resource=resource, effective_from__lte=at).order_by(
        "-effective_from"
    )


def price_at_subqueries(*, resource, at) -> dict[str, Subquery]:
    """price_at's unit price and currency of `resource` at `at` (expressions of a row's query,
    OuterRef for its columns) as two subqueries of that query, under PRICE_AT's keys: null
    where the resource has no price yet (price_at's default then applies)."""
    prices = _prices_in_force(resource=resource, at=at)
    unit, currency = PRICE_AT
    return {
        unit: Subquery(prices.values("unit_price")[:1]),
        currency: Subquery(prices.values("currency")[:1]),
    }


PRICE_AT = ("price_at__unit_price", "price_at__currency")


def gpu_resource_expression(resource_class_name):
    """gpu_resource() of an expression, in SQL."""
    return Concat(Value("gpu:"), resource_class_name, output_field=CharField())


def _price_in_force(*, resource: str, at: datetime):
    """price_at's answer for one resource, as a row."""
    return _prices_in_force(resource=resource, at=at).values("unit_price", "currency")[:1]


# Every job submit prices its estimate: compiled once per process (tenants.compiled).
_PRICE_IN_FORCE = CompiledRows(_price_in_force, resource=str, at=datetime)


def unit_price(*, resource: str, at: datetime) -> tuple[Decimal, str]:
    """What price_at says of `resource` at `at`, in one statement compiled once."""
    rows = _PRICE_IN_FORCE.rows(resource=resource, at=at)
    if not rows:  # no price yet: price_at's default
        return price_at({}, resource=resource, at=at)
    return rows[0]["unit_price"], rows[0]["currency"]


def gpu_resource(resource_class_name: str) -> str:
    return f"gpu:{resource_class_name}"


def month_spends(*, organization_ids, at: datetime) -> dict[int, int]:
    """Cents billed to each organization's ledger in the month of `at` (before credits)."""
    return dict(
        UsageTally.objects.filter(organization_id__in=organization_ids, month=billing_month(at))
        .values("organization_id")
        .annotate(total=Sum("billed_minor"))
        .values_list("organization_id", "total")
    )


def month_spend(*, organization: Organization, at: datetime) -> int:
    return month_spends(organization_ids=[organization.pk], at=at).get(organization.pk, 0)


def usage_latest_keyed(*, organization: Organization, key_prefix: str) -> UsageRecord | None:
    """The organization's newest ledger row whose idempotency key starts with `key_prefix`."""
    return (
        UsageRecord.objects.for_organization(organization)
        .filter(idempotency_key__startswith=key_prefix)
        .order_by("-created_at", "-pk")
        .first()
    )


def usage_billed_through(*, source_type: str, attempts: dict[str, int]) -> dict[str, datetime]:
    """For each source id and its attempt number, the end of the latest ledger row: how far an
    attempt billed while it runs (a serving replica's) is billed already."""
    if not attempts:
        return {}
    wanted = Q()
    for source_id, attempt in attempts.items():
        wanted |= Q(source_id=source_id, attempt=attempt)
    rows = (
        UsageRecord.objects.filter(source_type=source_type)
        .filter(wanted)
        .values("source_id")
        .annotate(through=Max("period_end"))
    )
    return {row["source_id"]: row["through"] for row in rows}


def credits_available(*, organization: Organization, at: datetime) -> int:
    total = (
        CreditGrant.objects.for_organization(organization)
        .filter(created_at__lte=at)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=at))
        .aggregate(total=Sum("remaining_minor"))["total"]
    )
    return total or 0


PAST_DUE_REASON = "payment past due: update the payment method on the billing page"
BUDGET_REASON = "budget reached"
SUSPENDED_REASON = "organization suspended"


def placement_blocks(
    *, organizations: list[Organization], now: datetime, running_minor: dict[int, int]
) -> dict[int, str]:
    """Why an organization may not start new jobs now, for those that may not (2 queries).

    Suspended; past due longer than the grace period; or a hard-capped budget reached by the
    month's ledger plus `running_minor`, the cost so far of attempts still running.
    """
    blocks: dict[int, str] = {}
    for organization in organizations:
        if organization.status == Organization.Status.SUSPENDED:
            blocks[organization.pk] = SUSPENDED_REASON
    ids = [o.pk for o in organizations if o.pk not in blocks]
    accounts = BillingAccount.objects.filter(organization_id__in=ids).filter(
        Q(past_due_since__isnull=False)
        | Q(budget_hard_cap=True, monthly_budget_minor__isnull=False)
    )
    capped = {}
    grace = timedelta(days=settings.BILLING_PAST_DUE_GRACE_DAYS)
    for account in accounts:
        if account.past_due_since is not None and account.past_due_since + grace <= now:
            blocks[account.organization_id] = PAST_DUE_REASON
        elif account.budget_hard_cap:
            capped[account.organization_id] = account.monthly_budget_minor
    if capped:
        spend = month_spends(organization_ids=list(capped), at=now)
        for organization_id, budget in capped.items():
            if spend.get(organization_id, 0) + running_minor.get(organization_id, 0) >= budget:
                blocks[organization_id] = BUDGET_REASON
    return blocks


def _account_may_block(*, organization: int):
    """The organization's account where placement_blocks could stop it (past due, or a hard
    budget cap): its one query's condition, for the organization alone."""
    return (
        BillingAccount.objects.for_organization(Organization(pk=organization))
        .filter(
            Q(past_due_since__isnull=False)
            | Q(budget_hard_cap=True, monthly_budget_minor__isnull=False)
        )
        .order_by()
        .values("pk")
    )


# Asked on every request that spends (every job submit): compiled once per process.
_ACCOUNT_MAY_BLOCK = CompiledRows(_account_may_block, organization=int)


def organization_standing(organization: Organization) -> Restriction | None:
    """Billing's part of what an organization may still do (registered with tenants.standing).

    The same rule as placement, from the ledger alone: the running attempts' cost, which the
    scheduler adds, lives in jobs, which billing does not read. An account that is neither past
    due nor hard-capped (most) answers from one compiled statement; the others as placement.
    """
    if not _ACCOUNT_MAY_BLOCK.rows(organization=organization.pk):
        return None
    reason = placement_blocks(
        organizations=[organization], now=timezone.now(), running_minor={}
    ).get(organization.pk)
    if reason == PAST_DUE_REASON:
        return payment_past_due(
            "Payment is past due: update the payment method or pay the open invoice on the "
            "billing page to start new work again. Running jobs finish."
        )
    if reason == BUDGET_REASON:
        return budget_reached(
            "This month's budget is reached and its hard cap is on: raise the budget on the "
            "billing page to start new work again. Running jobs finish."
        )
    return None


@dataclass(frozen=True)
class PlanQuota:
    guaranteed_gpus: int
    limit_gpus: int
    max_running_jobs: int


def plan_quotas(*, organization_ids: list[int]) -> dict[int, PlanQuota]:
    """Each organization's default quota from its plan (those without an account: none)."""
    rows = BillingAccount.objects.filter(organization_id__in=organization_ids).values_list(
        "organization_id", "plan__guaranteed_gpus", "plan__limit_gpus", "plan__max_running_jobs"
    )
    return {org_id: PlanQuota(*quota) for org_id, *quota in rows}


def budget_banner(*, organization: Organization, at: datetime) -> BudgetAlert | None:
    """The highest budget threshold crossed this month, for the dashboard's banner."""
    return (
        BudgetAlert.objects.for_organization(organization)
        .filter(month=billing_month(at))
        .order_by("-threshold")
        .first()
    )


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


# Accounts


def default_plan() -> Plan:
    """The plan a new account starts on; unsaved plain pay as you go when an operator has
    deactivated every plan."""
    plan = Plan.objects.filter(active=True).order_by("-is_default", "monthly_fee_minor").first()
    return plan or Plan(code="payg", name="Pay as you go")


def billing_account_get(*, organization: Organization) -> BillingAccount:
    """The organization's account. One made without `organization_create` (a fixture, the
    admin) has none until a write needs it: it reads as an unsaved account on the default plan.
    """
    account = BillingAccount.objects.for_organization(organization).select_related("plan").first()
    if account is None:
        account = BillingAccount(organization=organization, plan=default_plan())
    return account


@dataclass
class AccountSummary:
    """An account with the month's figures beside it, for the billing page and API."""

    account: BillingAccount
    currency: str
    month_spend_minor: int
    credits_available_minor: int
    placement_blocked: str

    def __getattr__(self, name):  # the account's own fields read through
        return getattr(self.account, name)

    @property
    def budget_used_percent(self) -> float | None:
        budget = self.account.monthly_budget_minor
        if not budget:
            return None
        return round(100 * self.month_spend_minor / budget, 1)


def account_summary(*, account: BillingAccount, at: datetime) -> AccountSummary:
    organization = account.organization
    return AccountSummary(
        account=account,
        currency=settings.BILLING_CURRENCY,
        month_spend_minor=month_spend(organization=organization, at=at),
        credits_available_minor=credits_available(organization=organization, at=at),
        placement_blocked=placement_blocks(
            organizations=[organization], now=at, running_minor={}
        ).get(organization.pk, ""),
    )


# Stripe's objects for ours


def stripe_enabled() -> bool:
    """Whether Stripe bills here (else the built-in ledger issues the invoices)."""
    return bool(settings.STRIPE_SECRET_KEY)


def stripe_id_known(*, kind: str, key: str) -> str | None:
    return (
        StripeObject.objects.filter(kind=kind, key=key).values_list("stripe_id", flat=True).first()
    )


def billable_resources() -> list[str]:
    return sorted(set(Price.objects.values_list("resource", flat=True)))


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


# Operators: the Stripe outbox and reconciliation, read by the admin, /ops/ and the tests.

STUCK_ATTEMPTS = 5
STUCK_OVERDUE = timedelta(hours=1)


def meter_push_stuck(*, now: datetime) -> QuerySet[MeterPush]:
    """Outbox rows an operator should look at: retried often, or overdue by over an hour."""
    return MeterPush.objects.filter(state=MeterPush.State.PENDING).filter(
        Q(attempts__gte=STUCK_ATTEMPTS) | Q(next_attempt_at__lte=now - STUCK_OVERDUE)
    )


def meter_push_pending() -> dict:
    """The Stripe meter-event outbox's backlog: `pending` rows and `oldest`, when the earliest
    of their ledger rows was written (None with none); one query (Prometheus)."""
    return MeterPush.objects.filter(state=MeterPush.State.PENDING).aggregate(
        pending=Count("pk"), oldest=Min("usage__created_at")
    )


def reconciliation_differences() -> QuerySet[Reconciliation]:
    """Days and resources where the ledger and Stripe disagree."""
    return Reconciliation.objects.exclude(ledger_minor=F("stripe_minor"))
