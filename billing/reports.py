"""Usage reports from the ledger: cost by resource, day, user, key, label, model or job (tenants),
and the operators' billing overview (all tenants, staff only)."""

from __future__ import annotations

import csv
import functools
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db.models import Case, CharField, F, QuerySet, Sum, Value, When
from django.db.models.fields.json import KeyTextTransform
from django.db.models.functions import TruncDate

from tenants.compiled import CompiledRows
from tenants.models import Organization

from .errors import BillingError
from .models import MeterPush, Reconciliation, UsageRecord
from .selectors import (
    STUCK_ATTEMPTS,
    billing_month,
    meter_push_stuck,
    minor_per_unit,
    month_bounds,
    reconciliation_differences,
)

GROUPINGS: dict[str, str] = {
    "resource": "Resource",
    "day": "Day",
    "user": "User",
    "api_key": "API key",
    "label": "Label",
    "model": "Model",
    "job": "Job",
}
MAX_RANGE_DAYS = 366
MAX_LABEL_KEY_LENGTH = 100
EARLIEST_DAY, LATEST_DAY = date(2000, 1, 1), date(9998, 12, 31)
NONE_LABELS = {
    "user": "(no user)",
    "api_key": "(no API key: dashboard or platform)",
    "label": "(none)",
    "model": "(no model)",
    "job": "(not a job: storage, predictions)",
}
JOB_SOURCE = "job_attempt"


@dataclass(frozen=True)
class UsageRow:
    """One group of the report; `key` is its identity (a date, user id, job id), else None."""

    group: str
    key: str | None
    amount_minor: int
    currency: str
    quantity: Decimal | None = None  # only where every row of the group has one unit
    unit: str = ""


@dataclass(frozen=True)
class UsageDay:
    day: date
    amounts: dict[str, int]  # resource -> minor units, in the report's currency
    total_minor: int


@dataclass(frozen=True)
class UsageTotal:
    currency: str
    amount_minor: int


@dataclass(frozen=True)
class UsageReport:
    start: date
    end: date
    group_by: str
    label_key: str
    currency: str
    total_minor: int  # in `currency`; a ledger with several currencies has one total each
    totals: list[UsageTotal]
    rows: list[UsageRow]
    daily: list[UsageDay]
    resources: list[str] = field(default_factory=list)  # chart order: most spent first

    @property
    def group_label(self) -> str:
        return GROUPINGS[self.group_by]


@dataclass(frozen=True)
class UsageQuery:
    start: date
    end: date
    group_by: str
    label_key: str = ""

    def as_kwargs(self) -> dict:
        return {
            "start": self.start,
            "end": self.end,
            "group_by": self.group_by,
            "label_key": self.label_key,
        }


def usage_defaults(*, today: date) -> tuple[date, date]:
    """Month to date (UTC)."""
    return today.replace(day=1), today


def month_usage(*, organization: Organization, today: date) -> list[UsageRow]:
    """Month to date by resource, for the summaries that show spend: what was used beside what
    it cost, so work priced at nothing (CPU) still shows."""
    start, end = usage_defaults(today=today)
    return usage_report(organization=organization, start=start, end=end, group_by="resource").rows


def _parse_day(value: str, name: str, errors: dict[str, list[str]]) -> date | None:
    try:
        return datetime.strptime(value.strip(), "%Y-%m-%d").date()
    except ValueError:
        errors[name] = [f"{value!r} is not a date; write it as YYYY-MM-DD, e.g. 2026-11-01."]
        return None


def usage_query(params: Mapping[str, str], *, today: date) -> UsageQuery:
    """Read and check a report's parameters (query strings); every mistake is a field error."""
    default_start, default_end = usage_defaults(today=today)
    errors: dict[str, list[str]] = {}
    raw_start, raw_end = params.get("start") or "", params.get("end") or ""
    start = _parse_day(raw_start, "start", errors) if raw_start else default_start
    end = _parse_day(raw_end, "end", errors) if raw_end else default_end
    group_by = (params.get("group_by") or "resource").strip()
    label_key = (params.get("label_key") or "").strip()
    errors |= _errors(start=start, end=end, group_by=group_by, label_key=label_key)
    if errors:
        raise _invalid(errors)
    return UsageQuery(start=start, end=end, group_by=group_by, label_key=label_key)


def _errors(
    *, start: date | None, end: date | None, group_by: str, label_key: str
) -> dict[str, list[str]]:
    errors: dict[str, list[str]] = {}
    for name, day in (("start", start), ("end", end)):
        if day is not None and not EARLIEST_DAY <= day <= LATEST_DAY:
            errors[name] = [f"Pick a date from {EARLIEST_DAY} to {LATEST_DAY}."]
    if not errors and start is not None and end is not None:
        if start > end:
            errors["end"] = [f"The end is before the start; pick an end on or after {start}."]
        elif (end - start).days + 1 > MAX_RANGE_DAYS:
            errors["end"] = [
                f"A report covers at most {MAX_RANGE_DAYS} days; this range has "
                f"{(end - start).days + 1}. Narrow it, or export it in parts."
            ]
    if group_by not in GROUPINGS:
        errors["group_by"] = [f"Unknown grouping {group_by!r}; use one of {', '.join(GROUPINGS)}."]
    if group_by == "label" and not label_key:
        errors["label_key"] = ["Grouping by label needs the label's key, e.g. project."]
    elif label_key and not label_key[0].isalpha():
        errors["label_key"] = ["Label keys start with a letter, e.g. project."]
    if len(label_key) > MAX_LABEL_KEY_LENGTH:
        errors["label_key"] = [f"A label key has at most {MAX_LABEL_KEY_LENGTH} characters."]
    return errors


def _invalid(errors: dict[str, list[str]]) -> BillingError:
    return BillingError(
        "The usage report's parameters are not valid: " + ", ".join(errors) + ".", fields=errors
    )


def _day_bounds(start: date, end: date) -> tuple[datetime, datetime]:
    """Inclusive UTC days as a half-open range of period_end, which the ledger index serves."""
    return (
        datetime(start.year, start.month, start.day, tzinfo=UTC),
        datetime(end.year, end.month, end.day, tzinfo=UTC) + timedelta(days=1),
    )


def _group_expression(group_by: str, label_key: str) -> dict:
    """What to GROUP BY, as annotations named g_*."""
    if group_by == "resource":
        return {"g_key": F("resource")}
    if group_by == "day":
        return {"g_key": UTCDate("period_end")}
    if group_by == "user":
        return {"g_key": F("user_id"), "g_email": F("user__email")}
    if group_by == "api_key":
        return {
            "g_key": F("api_key_id"),
            "g_name": F("api_key__name"),
            "g_prefix": F("api_key__prefix"),
        }
    if group_by == "label":
        return {"g_key": KeyTextTransform(label_key, "labels")}
    if group_by == "model":
        return {"g_key": F("model_name")}
    return {
        "g_key": Case(
            When(source_type=JOB_SOURCE, then=F("source_id")),
            default=Value(None),
            output_field=CharField(),
        )
    }


class UTCDate(TruncDate):
    """The UTC day of a moment. PostgreSQL's SQL names the time zone in its text, where TruncDate
    makes it a parameter: the day grouping selects the day twice (its group and the cell's day),
    and with values bound on the server two parameters are two expressions to PostgreSQL, so the
    GROUP BY no longer covers the SELECT (Django's ticket 20516). With no parameter the report's
    statement can be prepared (CompiledRows). Elsewhere TruncDate's own SQL."""

    def __init__(self, expression, **extra) -> None:
        super().__init__(expression, tzinfo=UTC, **extra)

    def as_postgresql(self, compiler, connection):
        sql, params = compiler.compile(self.lhs)
        return f"({sql} AT TIME ZONE 'UTC')::date", tuple(params)


def _group_name(group_by: str, values: dict) -> tuple[str, str | None]:
    key = values["g_key"]
    if key in (None, ""):
        return NONE_LABELS.get(group_by, "(none)"), None
    if group_by == "day":
        return key.isoformat(), key.isoformat()
    if group_by == "user":
        return values["g_email"] or f"user {key}", str(key)
    if group_by == "api_key":
        return f"{values['g_name']} ({values['g_prefix']}…)", str(key)
    if group_by == "job":
        return f"Job {key}", str(key)
    return str(key), str(key)


def _cells(*, organization: int, since: datetime, until: datetime, groups: dict) -> QuerySet:
    """The ledger's sums by group, day, resource, currency and unit (usage_report's one query)."""
    return (
        UsageRecord.objects.for_organization(organization)
        .filter(period_end__gte=since, period_end__lt=until)
        .annotate(**groups, cell_day=UTCDate("period_end"))
        .values(*groups, "cell_day", "resource", "currency", "unit")
        .annotate(amount=Sum("amount_minor"), quantity=Sum("quantity"))
        .order_by()
    )


# usage_report's query compiled once per grouping (tenants.compiled): building and compiling it
# was most of the usage summary's CPU beside authentication (docs/benchmarks.md).
_CELLS: dict[str, CompiledRows] = {}


def usage_report(
    *, organization: Organization, start: date, end: date, group_by: str, label_key: str = ""
) -> UsageReport:
    """The organization's ledger from `start` to `end` (UTC days of period_end, inclusive).

    One aggregate query, by group, day, resource, currency and unit: the groups, the totals and
    the daily series by resource are sums of its cells (three queries over the same rows cost the
    API's usage summary a third of its time). The groups of every grouping add up to the totals,
    since each ledger row falls in exactly one group.
    """
    label_key = label_key.strip()
    errors = _errors(start=start, end=end, group_by=group_by, label_key=label_key)
    if errors:
        raise _invalid(errors)
    since, until = _day_bounds(start, end)
    groups = _group_expression(group_by, label_key)
    if group_by == "label":  # the label key is part of the query's text
        cells = list(_cells(organization=organization.pk, since=since, until=until, groups=groups))
    else:
        if group_by not in _CELLS:
            _CELLS[group_by] = CompiledRows(
                functools.partial(_cells, groups=groups),
                organization=int,
                since=datetime,
                until=datetime,
                prepared=True,
            )
        cells = _CELLS[group_by].rows(organization=organization.pk, since=since, until=until)

    by_currency: dict[str, int] = defaultdict(int)
    for cell in cells:
        by_currency[cell["currency"]] += cell["amount"]
    totals = sorted(
        (UsageTotal(currency=name, amount_minor=amount) for name, amount in by_currency.items()),
        key=lambda total: (-total.amount_minor, total.currency),
    )
    currency = _report_currency(totals)
    total_minor = by_currency.get(currency, 0)

    grouped: dict[tuple, dict] = {}
    for cell in cells:
        group = grouped.setdefault(
            (*(cell[name] for name in groups), cell["currency"]),
            {**cell, "amount": 0, "quantity": Decimal(0), "units": set()},
        )
        group["amount"] += cell["amount"]
        group["quantity"] += cell["quantity"]
        group["units"].add(cell["unit"])
    rows = []
    for values in grouped.values():
        name, key = _group_name(group_by, values)
        one_unit = len(values["units"]) == 1
        rows.append(
            UsageRow(
                group=name,
                key=key,
                amount_minor=values["amount"],
                currency=values["currency"],
                quantity=values["quantity"] if one_unit else None,
                unit=min(values["units"]) if one_unit else "",
            )
        )
    if group_by == "day":
        rows.sort(key=lambda row: (row.key or "", row.currency))
    else:
        rows.sort(key=lambda row: (-row.amount_minor, row.group, row.currency))

    daily, resources = _daily_by_resource(cells, start=start, end=end, currency=currency)
    return UsageReport(
        start=start,
        end=end,
        group_by=group_by,
        label_key=label_key,
        currency=currency,
        total_minor=total_minor,
        totals=totals,
        rows=rows,
        daily=daily,
        resources=resources,
    )


def _report_currency(totals: list[UsageTotal]) -> str:
    currencies = {total.currency for total in totals}
    if not currencies or settings.BILLING_CURRENCY in currencies:
        return settings.BILLING_CURRENCY
    return totals[0].currency


def _daily_by_resource(
    cells: list[dict], *, start: date, end: date, currency: str
) -> tuple[list[UsageDay], list[str]]:
    """Every day of the range, zero-filled, with its cost per resource (in the report currency)."""
    by_day: dict[date, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    per_resource: dict[str, int] = defaultdict(int)
    for cell in cells:
        if cell["currency"] != currency:
            continue
        by_day[cell["cell_day"]][cell["resource"]] += cell["amount"]
        per_resource[cell["resource"]] += cell["amount"]
    resources = sorted(per_resource, key=lambda name: (-per_resource[name], name))
    daily = []
    for offset in range((end - start).days + 1):
        day = start + timedelta(days=offset)
        amounts = {name: by_day.get(day, {}).get(name, 0) for name in resources}
        daily.append(UsageDay(day=day, amounts=amounts, total_minor=sum(amounts.values())))
    return daily, resources


def major_units(amount_minor: int, currency: str) -> Decimal:
    """Cents as an exact decimal amount (1234 usd -> 12.34), for exports; never a float."""
    digits = len(str(minor_per_unit(currency))) - 1
    return Decimal(amount_minor).scaleb(-digits)


class _Echo:
    """A file-like object whose write returns the line, so csv.writer can feed a stream."""

    def write(self, value: str) -> str:
        return value


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(text: str) -> str:
    # Spreadsheets run a cell starting with = + - @ as a formula; label values come from users.
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def usage_csv(
    *, organization: Organization, start: date, end: date, group_by: str, label_key: str = ""
) -> Iterator[str]:
    """The report as CSV lines: a header, one line per group, a total line per currency.

    The report is built (and its parameters checked) before the first line, so a bad request
    fails before a response starts streaming.
    """
    report = usage_report(
        organization=organization, start=start, end=end, group_by=group_by, label_key=label_key
    )
    return usage_csv_lines(report)


def usage_csv_lines(report: UsageReport) -> Iterator[str]:
    writer = csv.writer(_Echo())
    heading = f"label:{report.label_key}" if report.group_by == "label" else report.group_by
    yield writer.writerow(
        [heading, "key", "quantity", "unit", "amount", "amount_minor", "currency"]
    )
    for row in report.rows:
        yield writer.writerow(
            [
                _cell(row.group),
                _cell(row.key or ""),
                "" if row.quantity is None else row.quantity,
                row.unit,
                major_units(row.amount_minor, row.currency),
                row.amount_minor,
                row.currency,
            ]
        )
    for total in report.totals or [UsageTotal(report.currency, 0)]:
        yield writer.writerow(
            [
                "Total",
                "",
                "",
                "",
                major_units(total.amount_minor, total.currency),
                total.amount_minor,
                total.currency,
            ]
        )


def usage_csv_filename(*, organization: Organization, report: UsageReport) -> str:
    return f"usage-{organization.slug}-{report.start}-{report.end}-{report.group_by}.csv"


# Operators: every tenant at once. Only the staff-only /ops/billing/ page reads these.

TOP_TENANTS = 10
RECONCILIATION_ROWS = 20
GPU_PREFIX = "gpu:"
SECONDS_PER_HOUR = Decimal(3600)


@dataclass(frozen=True)
class OpsBillingOverview:
    month: date
    revenue: list[UsageTotal]  # ledger amount this month, all tenants, per currency
    top_tenants: list[dict]  # organization_id, name, slug, currency, amount_minor
    gpu_hours: list[dict]  # resource, resource_class, gpu_hours, amount_minor, currency
    stuck_meter_count: int
    stuck_meter_oldest: MeterPush | None
    reconciliation_differences: list[Reconciliation]

    @property
    def currency(self) -> str:
        return self.revenue[0].currency if self.revenue else settings.BILLING_CURRENCY

    @property
    def stuck_attempts(self) -> int:
        return STUCK_ATTEMPTS

    @property
    def revenue_minor(self) -> int:
        return next((r.amount_minor for r in self.revenue if r.currency == self.currency), 0)


def ops_billing_overview(*, now: datetime) -> OpsBillingOverview:
    """This month across all tenants, in a fixed number of queries (none per tenant)."""
    month = billing_month(now)
    since, until = month_bounds(month)
    # One pass over the month's ledger, grouped finely enough for all three tables (tenants x
    # resources x currencies: hundreds of groups), instead of one pass per table.
    cells = list(
        UsageRecord.objects.filter(period_end__gte=since, period_end__lt=until)
        .values("organization_id", "resource", "currency")
        .annotate(amount=Sum("amount_minor"), quantity=Sum("quantity"))
        .order_by()
    )
    by_currency: dict[str, int] = defaultdict(int)
    by_tenant: dict[tuple[int, str], int] = defaultdict(int)
    by_resource: dict[tuple[str, str], list] = {}
    for cell in cells:
        by_currency[cell["currency"]] += cell["amount"]
        by_tenant[(cell["organization_id"], cell["currency"])] += cell["amount"]
        if cell["resource"].startswith(GPU_PREFIX):
            sums = by_resource.setdefault((cell["resource"], cell["currency"]), [0, 0])
            sums[0] += cell["quantity"]
            sums[1] += cell["amount"]

    revenue = [
        UsageTotal(currency=currency, amount_minor=amount)
        for currency, amount in sorted(by_currency.items(), key=lambda c: (-c[1], c[0]))
    ]
    top = sorted(by_tenant.items(), key=lambda t: (-t[1], t[0][0]))[:TOP_TENANTS]
    names = {
        o["pk"]: o
        for o in Organization.objects.filter(pk__in={org_id for (org_id, _c), _a in top}).values(
            "pk", "name", "slug"
        )
    }
    top_tenants = [
        {
            "organization_id": org_id,
            "currency": currency,
            "name": names[org_id]["name"],
            "slug": names[org_id]["slug"],
            "amount_minor": amount,
        }
        for (org_id, currency), amount in top
    ]
    gpu_hours = [
        {
            "resource": resource,
            "resource_class": resource.removeprefix(GPU_PREFIX),
            "gpu_hours": (seconds / SECONDS_PER_HOUR).quantize(Decimal("0.01")),
            "amount_minor": amount,
            "currency": currency,
        }
        for (resource, currency), (seconds, amount) in sorted(by_resource.items())
    ]

    stuck = meter_push_stuck(now=now)
    stuck_count = stuck.count()
    oldest = (
        stuck.select_related("usage__organization").order_by("next_attempt_at", "usage_id").first()
        if stuck_count
        else None
    )
    differences = list(
        reconciliation_differences()
        .select_related("organization")
        .order_by("-day", "-checked_at", "organization_id", "resource")[:RECONCILIATION_ROWS]
    )
    return OpsBillingOverview(
        month=month,
        revenue=revenue,
        top_tenants=top_tenants,
        gpu_hours=gpu_hours,
        stuck_meter_count=stuck_count,
        stuck_meter_oldest=oldest,
        reconciliation_differences=differences,
    )
