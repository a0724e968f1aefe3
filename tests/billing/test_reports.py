"""Usage reports (selectors, API, page, CSV) and the operators' billing overview (its page is
tested with the other /ops/ pages in tests/factory_saas/test_ops.py)."""

import csv
import io
import json
import re
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from billing import reports
from billing import views as billing_views
from billing.api.serializers import UsageReportSerializer, usage_report_data
from billing.charts import MAX_SERIES, stacked_daily_chart
from billing.errors import BillingError
from billing.models import MeterPush, Price, Reconciliation, UsageRecord
from charts import PALETTE
from factory_saas.templatetags.money import cents
from tenants.actors import Actor
from tenants.scopes import Role
from tenants.services import api_key_create
from tests.billing.ledgers import month_ledger_create, prices_create, record
from tests.factories import MembershipFactory, OrganizationFactory

START, END = date(2026, 10, 1), date(2026, 10, 7)
GROUPINGS = list(reports.GROUPINGS)


def at(day: int, hour: int = 12, minute: int = 0, second: int = 0, month: int = 10) -> datetime:
    return datetime(2026, month, day, hour, minute, second, tzinfo=UTC)


@pytest.fixture
def prices(db, settings):
    settings.STRIPE_SECRET_KEY = ""  # no outbox rows of its own: the tests plant stuck ones
    prices_create()


@pytest.fixture
def ledger(prices):
    """A week of one organization's usage, rows just outside it, and another organization's."""
    org, other = OrganizationFactory(), OrganizationFactory()
    alice = MembershipFactory(organization=org, role=Role.DEVELOPER).user
    bob = MembershipFactory(organization=org, role=Role.DEVELOPER).user
    key, _token = api_key_create(
        organization=org, name="ci", scopes=["jobs:write"], actor=Actor(user=bob)
    )
    job = {"source_type": "job_attempt"}
    record(
        org,
        resource="gpu:a100",
        quantity="3600",
        end=at(1),
        key="j101a1",
        **job,
        source_id="101",
        user=alice,
        labels={"project": "alpha"},
        model_name="m1",
    )
    record(
        org,
        resource="gpu:a100",
        quantity="1800",
        end=at(2),
        key="j102a1",
        **job,
        source_id="102",
        user=bob,
        api_key=key,
        labels={"project": "beta"},
        model_name="m2",
    )
    record(
        org,
        resource="predictions",
        quantity="5",
        unit="1k_predictions",
        end=at(2, 15),
        key="p1",
        source_type="model_version",
        source_id="9",
        user=bob,
        api_key=key,
        model_name="m2",
    )
    record(
        org,
        resource="storage",
        quantity="0.5",
        unit="gb_month",
        end=at(4, 0, 0, 1),
        key="s1",
        source_type="storage",
        source_id=str(org.pk),
    )
    record(
        org,
        resource="gpu:t4",
        quantity="7200",
        end=at(4, 9),
        key="j103a1",
        **job,
        source_id="103",
        user=alice,
        labels={"team": "x"},
    )
    # The last second of the range belongs to it; the seconds either side do not.
    record(
        org,
        resource="gpu:a100",
        quantity="600",
        end=at(7, 23, 59, 59),
        key="j101a2",
        **job,
        source_id="101",
        attempt=2,
        user=alice,
        labels={"project": "alpha"},
        model_name="m1",
    )
    record(
        org,
        resource="gpu:a100",
        quantity="999",
        end=at(30, 23, 59, 59, month=9),
        key="early",
        **job,
        source_id="100",
        user=alice,
        labels={"project": "alpha"},
    )
    record(
        org,
        resource="gpu:a100",
        quantity="999",
        end=at(8, 0),
        key="late",
        **job,
        source_id="104",
        user=alice,
        labels={"project": "alpha"},
    )
    outsider = MembershipFactory(organization=other, role=Role.OWNER).user
    record(
        other,
        resource="gpu:a100",
        quantity="5000",
        end=at(2),
        key="o1",
        **job,
        source_id="900",
        user=outsider,
        labels={"project": "secret-project"},
        model_name="other-model",
    )
    record(other, resource="gpu:h100", quantity="5000", end=at(3), key="o2")
    return {
        "org": org,
        "other": other,
        "alice": alice,
        "bob": bob,
        "key": key,
        "outsider": outsider,
    }


def ledger_rows(organization):
    """The organization's rows in the week, chosen in Python (independently of the SQL)."""
    return [
        row
        for row in UsageRecord.objects.filter(organization=organization)
        if START <= row.period_end.astimezone(UTC).date() <= END
    ]


def expected_groups(rows, group_by, label_key="project"):
    def group(row):
        if group_by == "resource":
            return row.resource
        if group_by == "day":
            return row.period_end.astimezone(UTC).date().isoformat()
        none = reports.NONE_LABELS.get(group_by)
        if group_by == "user":
            return row.user.email if row.user else none
        if group_by == "api_key":
            return f"{row.api_key.name} ({row.api_key.prefix}…)" if row.api_key else none
        if group_by == "label":
            return row.labels.get(label_key, none)
        if group_by == "model":
            return row.model_name or none
        return f"Job {row.source_id}" if row.source_type == "job_attempt" else none

    amounts = defaultdict(int)
    for row in rows:
        amounts[group(row)] += row.amount_minor
    return dict(amounts)


def report_for(ledger, group_by, **kwargs):
    kwargs.setdefault("label_key", "project" if group_by == "label" else "")
    return reports.usage_report(
        organization=ledger["org"], start=START, end=END, group_by=group_by, **kwargs
    )


@pytest.mark.django_db
@pytest.mark.parametrize("group_by", GROUPINGS)
def test_every_grouping_adds_up_to_the_ledger_total_to_the_cent(ledger, group_by):
    rows = ledger_rows(ledger["org"])
    assert len(rows) == 6  # the rows either side of the week are left out
    report = report_for(ledger, group_by)
    expected_total = sum(row.amount_minor for row in rows)
    assert expected_total > 0
    assert report.total_minor == expected_total
    assert sum(row.amount_minor for row in report.rows) == expected_total
    assert [(t.currency, t.amount_minor) for t in report.totals] == [("usd", expected_total)]


@pytest.mark.django_db
@pytest.mark.parametrize("group_by", GROUPINGS)
def test_each_group_holds_exactly_its_rows_and_no_other_organization(ledger, group_by):
    report = report_for(ledger, group_by)
    expected = expected_groups(ledger_rows(ledger["org"]), group_by)
    got = {row.group: row.amount_minor for row in report.rows}
    assert len(got) == len(report.rows)
    assert got == expected
    groups = {row.group for row in report.rows}
    leaked = {"secret-project", "other-model", "gpu:h100", "Job 900", "Job 100", "Job 104"}
    assert not groups & (leaked | {ledger["outsider"].email})


@pytest.mark.django_db
def test_rows_are_sorted_by_amount_and_days_by_date(ledger):
    by_model = report_for(ledger, "model")
    amounts = [row.amount_minor for row in by_model.rows]
    assert amounts == sorted(amounts, reverse=True)
    by_day = report_for(ledger, "day")
    assert [row.key for row in by_day.rows] == [
        "2026-10-01",
        "2026-10-02",
        "2026-10-04",
        "2026-10-07",
    ]


@pytest.mark.django_db
def test_quantity_is_given_only_where_a_group_has_one_unit(ledger):
    by_resource = {row.group: row for row in report_for(ledger, "resource").rows}
    assert by_resource["gpu:a100"].quantity == Decimal("6000")
    assert by_resource["gpu:a100"].unit == "gpu_second"
    assert by_resource["predictions"].quantity == Decimal("5")
    by_model = {row.group: row for row in report_for(ledger, "model").rows}
    assert by_model["m1"].quantity == Decimal("4200")
    assert by_model["m2"].quantity is None  # GPU-seconds and predictions do not add up


@pytest.mark.django_db
def test_grouping_by_another_label_key_puts_the_rest_under_none(ledger):
    report = report_for(ledger, "label", label_key="team")
    groups = {row.group: row.amount_minor for row in report.rows}
    assert set(groups) == {"x", "(none)"}
    assert sum(groups.values()) == report.total_minor


@pytest.mark.django_db
def test_daily_series_has_every_day_zero_filled_and_adds_up(ledger):
    report = report_for(ledger, "resource")
    days = [day.day for day in report.daily]
    assert days == [START + timedelta(days=n) for n in range(7)]
    empty = {date(2026, 10, 3), date(2026, 10, 5), date(2026, 10, 6)}
    expected = defaultdict(lambda: defaultdict(int))
    for row in ledger_rows(ledger["org"]):
        expected[row.period_end.astimezone(UTC).date()][row.resource] += row.amount_minor
    for day in report.daily:
        assert set(day.amounts) == set(report.resources)
        assert sum(day.amounts.values()) == day.total_minor
        assert {k: v for k, v in day.amounts.items() if v} == dict(expected[day.day])
        assert (day.total_minor == 0) == (day.day in empty)
    assert sum(day.total_minor for day in report.daily) == report.total_minor


@pytest.mark.django_db
def test_stacked_chart_segments_add_up_to_each_day(ledger):
    report = report_for(ledger, "resource")
    chart = stacked_daily_chart(
        daily=report.daily, resources=report.resources, currency=report.currency
    )
    assert len(chart["bars"]) == 7
    plot_height = chart["baseline"] - chart["top"]
    for bar, day in zip(chart["bars"], report.daily, strict=True):
        assert sum(s["amount_minor"] for s in bar["segments"]) == day.total_minor
        assert sum(s["height"] for s in bar["segments"]) <= plot_height + 0.05
    assert sum(item["amount_minor"] for item in chart["legend"]) == report.total_minor
    assert chart["ticks"][-1]["amount_minor"] >= max(day.total_minor for day in report.daily)


def test_chart_draws_resources_past_the_palette_as_one_other_series():
    names = [f"gpu:class-{n}" for n in range(MAX_SERIES + 3)]
    daily = [
        reports.UsageDay(
            day=date(2026, 1, 1), amounts={name: 10 for name in names}, total_minor=10 * len(names)
        )
    ]
    chart = stacked_daily_chart(daily=daily, resources=names, currency="usd")
    assert [item["name"] for item in chart["legend"]][-1] == "other"
    assert len(chart["legend"]) == MAX_SERIES + 1
    assert chart["legend"][-1]["amount_minor"] == 30
    assert sum(s["amount_minor"] for s in chart["bars"][0]["segments"]) == 10 * len(names)


@pytest.mark.django_db
def test_report_takes_a_fixed_number_of_queries(ledger, django_assert_num_queries):
    """One aggregate: groups, totals and the daily series are sums of its cells."""
    with django_assert_num_queries(1):
        report_for(ledger, "user")


@pytest.mark.django_db
def test_csv_parses_back_to_the_same_figures(ledger):
    report = report_for(ledger, "user")
    lines = reports.usage_csv(
        organization=ledger["org"], start=START, end=END, group_by="user", label_key=""
    )
    parsed = list(csv.reader(io.StringIO("".join(lines))))
    assert parsed[0] == ["user", "key", "quantity", "unit", "amount", "amount_minor", "currency"]
    body, total = parsed[1:-1], parsed[-1]
    assert [(r[0], int(r[5])) for r in body] == [(r.group, r.amount_minor) for r in report.rows]
    for line in body:
        assert Decimal(line[4]) * 100 == int(line[5])
    assert total[0] == "Total"
    assert int(total[5]) == report.total_minor == sum(int(r[5]) for r in body)
    assert Decimal(total[4]) * 100 == report.total_minor


@pytest.mark.django_db
def test_csv_defuses_label_values_that_spreadsheets_would_run(prices):
    org = OrganizationFactory()
    record(org, resource="gpu:a100", quantity="10", end=at(2), key="f", labels={"p": "=1+2"})
    lines = reports.usage_csv(
        organization=org, start=START, end=END, group_by="label", label_key="p"
    )
    parsed = list(csv.reader(io.StringIO("".join(lines))))
    assert parsed[0][0] == "label:p"
    assert parsed[1][0] == "'=1+2"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"start": END, "end": START, "group_by": "resource"}, "end"),
        ({"start": date(2025, 1, 1), "end": date(2026, 1, 2), "group_by": "resource"}, "end"),
        ({"start": START, "end": END, "group_by": "colour"}, "group_by"),
        ({"start": START, "end": END, "group_by": "label"}, "label_key"),
    ],
)
def test_report_refuses_bad_parameters_with_field_errors(org, kwargs, field):
    with pytest.raises(BillingError) as error:
        reports.usage_report(organization=org, **kwargs)
    assert list(error.value.fields) == [field]


@pytest.mark.django_db
def test_a_year_and_a_day_is_the_longest_range(org):
    report = reports.usage_report(
        organization=org, start=date(2024, 1, 1), end=date(2024, 12, 31), group_by="day"
    )
    assert len(report.daily) == 366 and report.total_minor == 0 and report.rows == []


# API


def usage_url(org, export=False):
    name = "billing-usage-export" if export else "billing-usage"
    return reverse(name, kwargs={"org_slug": org.slug})


@pytest.fixture
def billing_user(ledger):
    return MembershipFactory(organization=ledger["org"], role=Role.BILLING).user


@pytest.mark.django_db
@pytest.mark.parametrize("group_by", GROUPINGS)
def test_api_reports_the_ledger_for_each_grouping(ledger, billing_user, client_for, group_by):
    params = {"start": "2026-10-01", "end": "2026-10-07", "group_by": group_by}
    if group_by == "label":
        params["label_key"] = "project"
    response = client_for(billing_user).get(usage_url(ledger["org"]), params)
    assert response.status_code == 200, response.content
    body = response.json()
    expected_total = sum(row.amount_minor for row in ledger_rows(ledger["org"]))
    assert body["total_minor"] == expected_total
    assert sum(row["amount_minor"] for row in body["rows"]) == expected_total
    assert (body["start"], body["end"], body["group_by"]) == ("2026-10-01", "2026-10-07", group_by)
    assert body["currency"] == "usd"
    assert [day["date"] for day in body["daily"]][0::6] == ["2026-10-01", "2026-10-07"]
    assert sum(day["total_minor"] for day in body["daily"]) == expected_total


@pytest.mark.django_db
@pytest.mark.parametrize("group_by", GROUPINGS)
def test_api_data_is_the_serializers_field_by_field(ledger, group_by):
    report = report_for(ledger, group_by)
    assert report.rows and report.daily
    data = usage_report_data(report)
    assert data == UsageReportSerializer(report).data
    assert json.dumps(data, cls=DjangoJSONEncoder) == json.dumps(
        UsageReportSerializer(report).data, cls=DjangoJSONEncoder
    )


@pytest.mark.django_db
def test_api_defaults_to_month_to_date_by_resource(org, owner, client_for):
    response = client_for(owner).get(usage_url(org))
    assert response.status_code == 200
    body = response.json()
    today = timezone.now().date()
    assert body["start"] == today.replace(day=1).isoformat()
    assert body["end"] == today.isoformat()
    assert body["group_by"] == "resource"
    assert len(body["daily"]) == today.day


@pytest.mark.django_db
def test_api_key_with_billing_read_gets_the_report(ledger, billing_user, key_client_for):
    client = key_client_for(billing_user, ledger["org"], scopes=["billing:read"])
    response = client.get(usage_url(ledger["org"]), {"start": "2026-10-01", "end": "2026-10-07"})
    assert response.status_code == 200
    assert response.json()["total_minor"] > 0


@pytest.mark.django_db
def test_api_export_is_a_csv_attachment_with_the_same_figures(ledger, billing_user, client_for):
    params = {"start": "2026-10-01", "end": "2026-10-07", "group_by": "job"}
    client = client_for(billing_user)
    report = client.get(usage_url(ledger["org"]), params).json()
    response = client.get(usage_url(ledger["org"], export=True), params)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    assert response["Content-Disposition"] == (
        f'attachment; filename="usage-{ledger["org"].slug}-2026-10-01-2026-10-07-job.csv"'
    )
    text = b"".join(response.streaming_content).decode()
    parsed = list(csv.reader(io.StringIO(text)))
    assert [(r[0], int(r[5])) for r in parsed[1:-1]] == [
        (r["group"], r["amount_minor"]) for r in report["rows"]
    ]
    assert int(parsed[-1][5]) == report["total_minor"]


BAD_PARAMS = [
    ({"start": "2026-10-08", "end": "2026-10-01"}, "end"),
    ({"start": "2025-01-01", "end": "2026-10-01"}, "end"),
    ({"start": "2026-13-01"}, "start"),
    ({"end": "yesterday"}, "end"),
    ({"group_by": "colour"}, "group_by"),
    ({"group_by": "label"}, "label_key"),
    ({"group_by": "label", "label_key": "k" * 101}, "label_key"),
    ({"start": "0001-01-01"}, "start"),
    ({"end": "9999-12-31"}, "end"),
]


@pytest.mark.django_db
@pytest.mark.parametrize("export", [False, True])
@pytest.mark.parametrize(("params", "field"), BAD_PARAMS)
def test_api_refuses_bad_parameters_with_a_field_error(
    org, owner, client_for, params, field, export
):
    response = client_for(owner).get(usage_url(org, export=export), params)
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "billing_error"
    assert field in body["fields"]
    assert body["fields"][field][0]


@pytest.mark.django_db
@pytest.mark.parametrize("export", [False, True])
@pytest.mark.parametrize("role", [Role.DEVELOPER, Role.VIEWER])
def test_api_needs_billing_read(org, client_for, key_client_for, role, export):
    user = MembershipFactory(organization=org, role=role).user
    assert client_for(user).get(usage_url(org, export=export)).status_code == 403
    assert key_client_for(user, org).get(usage_url(org, export=export)).status_code == 403


# Dashboard page


def page_url(org, name="billing:usage"):
    return reverse(name, kwargs={"org_slug": org.slug})


@pytest.mark.django_db
def test_page_shows_the_chart_table_total_and_export_link(ledger, billing_user, client):
    client.force_login(billing_user)
    params = {"start": "2026-10-01", "end": "2026-10-07", "group_by": "job"}
    response = client.get(page_url(ledger["org"]), params)
    assert response.status_code == 200
    html = response.content.decode()
    total = sum(row.amount_minor for row in ledger_rows(ledger["org"]))
    assert '<svg class="usage-chart" viewBox="0 0 480 220" role="img"' in html
    assert '<title id="usage-chart-title">' in html and '<desc id="usage-chart-desc">' in html
    assert f"Total {cents(total)}" in html  # in the chart's description
    assert f"<strong>{cents(total)}</strong>" in html  # the table's total
    assert reverse("jobs:job", args=[ledger["org"].slug, 101]) in html
    assert page_url(ledger["org"], "billing:usage_csv") + "?start=2026-10-01" in html
    assert 'value="2026-10-01"' in html and '<option value="job" selected>' in html
    assert "secret-project" not in html and "gpu:h100" not in html


@pytest.mark.django_db
def test_page_draws_the_charts_grid_and_legend(ledger, billing_user, client):
    client.force_login(billing_user)
    params = {"start": "2026-10-01", "end": "2026-10-07", "group_by": "resource"}
    response = client.get(page_url(ledger["org"]), params)
    html = response.content.decode()
    report, chart = response.context["report"], response.context["chart"]
    grid = re.search(r'<g class="usage-chart-grid" aria-hidden="true">(.*?)</g>', html, re.S)[1]
    tick_labels = re.findall(r'dominant-baseline="middle">([^<]*)</text>', grid)
    assert tick_labels == [cents(tick["amount_minor"]) for tick in chart["ticks"]]
    assert tick_labels[0] == cents(0) and len(tick_labels) == 5
    # Seven days, at most five labels: every other day.
    days = re.findall(r'y="214" text-anchor="middle">([^<]*)</text>', grid)
    assert days == ["Oct 1", "Oct 3", "Oct 5", "Oct 7"]
    legend = re.search(r'<ul class="chart-legend" aria-label="Legend">(.*?)</ul>', html, re.S)[1]
    items = re.findall(
        r'fill="(#\w{6})"/></svg> ([^<]*) <span class="muted">([^<]*)</span>', legend
    )
    assert items == [
        (PALETTE[n], name, cents(sum(day.amounts[name] for day in report.daily)))
        for n, name in enumerate(report.resources)
    ]


@pytest.mark.django_db
def test_page_lists_the_largest_groups_and_leaves_the_rest_to_the_csv(
    ledger, billing_user, client, monkeypatch
):
    monkeypatch.setattr(billing_views, "USAGE_ROWS_SHOWN", 2)
    client.force_login(billing_user)
    params = {"start": "2026-10-01", "end": "2026-10-07", "group_by": "job"}
    html = client.get(page_url(ledger["org"]), params).content.decode()
    groups = expected_groups(ledger_rows(ledger["org"]), "job")
    assert len(groups) > 2
    assert f"The 2 largest are shown; {len(groups) - 2} more are in the CSV." in html
    total = sum(groups.values())
    assert f"<strong>{cents(total)}</strong>" in html  # the total is still every row's
    days = client.get(page_url(ledger["org"]), {**params, "group_by": "day"}).content.decode()
    assert "more are in the CSV" not in days  # a year of days is always shown whole


@pytest.mark.django_db
@pytest.mark.parametrize(("params", "field"), BAD_PARAMS)
def test_page_shows_bad_parameters_inline_and_keeps_the_input(org, owner, client, params, field):
    client.force_login(owner)
    response = client.get(page_url(org), params)
    assert response.status_code == 400
    html = response.content.decode()
    assert f'id="usage-{field.replace("_", "-")}-errors"' in html
    for name, value in params.items():
        if name == "group_by":
            selected = f'<option value="{value}" selected>' in html
            assert selected == (value in reports.GROUPINGS)
        else:
            assert f'value="{value}"' in html
    assert "usage-chart" not in html


@pytest.mark.django_db
def test_page_csv_download_matches_the_report(ledger, billing_user, client):
    client.force_login(billing_user)
    params = {
        "start": "2026-10-01",
        "end": "2026-10-07",
        "group_by": "label",
        "label_key": "project",
    }
    response = client.get(page_url(ledger["org"], "billing:usage_csv"), params)
    assert response.status_code == 200
    assert response["Content-Disposition"].startswith("attachment;")
    parsed = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))
    expected = expected_groups(ledger_rows(ledger["org"]), "label")
    assert {r[0]: int(r[5]) for r in parsed[1:-1]} == expected
    assert int(parsed[-1][5]) == sum(expected.values())


@pytest.mark.django_db
def test_page_csv_with_bad_parameters_goes_back_to_the_form(org, owner, client):
    client.force_login(owner)
    response = client.get(page_url(org, "billing:usage_csv"), {"group_by": "colour"})
    assert response.status_code == 302
    assert response["Location"] == page_url(org) + "?group_by=colour"


@pytest.mark.django_db
@pytest.mark.parametrize("name", ["billing:usage", "billing:usage_csv"])
def test_page_needs_billing_read(org, client, name):
    developer = MembershipFactory(organization=org, role=Role.DEVELOPER).user
    client.force_login(developer)
    assert client.get(page_url(org, name)).status_code == 403


@pytest.mark.django_db
def test_billing_page_links_to_the_usage_report(org, owner, client):
    client.force_login(owner)
    html = client.get(page_url(org, "billing:billing")).content.decode()
    assert f'href="{page_url(org)}"' in html


@pytest.mark.django_db
def test_billing_page_and_overview_show_this_months_usage_beside_its_cost_even_when_free(
    prices, org, owner, client
):
    Price.objects.create(
        resource="gpu:cpu",
        unit="gpu_second",
        unit_price=Decimal(0),
        effective_from=timezone.now() - timedelta(days=400),
    )
    record(org, resource="gpu:cpu", quantity="42", end=timezone.now(), key="cpu")
    client.force_login(owner)
    for url in (page_url(org, "billing:billing"), page_url(org, "tenants:overview")):
        html = client.get(url).content.decode()
        start = html.index('<ul id="month-usage"')
        assert "gpu:cpu: 42 gpu_second · $0.00" in html[start : html.index("</ul>", start)], url


# Operators


@pytest.fixture
def month_ledger(prices):
    return month_ledger_create()


@pytest.mark.django_db
def test_ops_overview_adds_up_this_month_of_every_tenant(month_ledger):
    overview = reports.ops_billing_overview(now=month_ledger["now"])
    rows = month_ledger["rows"]
    assert overview.revenue_minor == sum(row.amount_minor for row in rows)
    spend = defaultdict(int)
    for row in rows:
        spend[row.organization_id] += row.amount_minor
    assert [(t["organization_id"], t["amount_minor"]) for t in overview.top_tenants] == sorted(
        spend.items(), key=lambda item: (-item[1], item[0])
    )
    hours = {row["resource_class"]: row["gpu_hours"] for row in overview.gpu_hours}
    assert hours == {"a100": Decimal("6.00"), "t4": Decimal("0.50")}


@pytest.mark.django_db
def test_ops_overview_finds_stuck_meter_events_only(month_ledger):
    now = month_ledger["now"]
    first, second, third, fourth = month_ledger["rows"][:4]
    MeterPush.objects.create(usage=first, attempts=5, next_attempt_at=now + timedelta(minutes=5))
    MeterPush.objects.create(usage=second, attempts=1, next_attempt_at=now - timedelta(hours=2))
    MeterPush.objects.create(usage=third, attempts=1, next_attempt_at=now - timedelta(minutes=5))
    MeterPush.objects.create(
        usage=fourth,
        state=MeterPush.State.SENT,
        attempts=9,
        next_attempt_at=now - timedelta(days=1),
    )
    overview = reports.ops_billing_overview(now=now)
    assert overview.stuck_meter_count == 2
    assert overview.stuck_meter_oldest.usage_id == second.pk


@pytest.mark.django_db
def test_ops_overview_queries_do_not_grow_with_tenants(month_ledger):
    now = month_ledger["now"]
    MeterPush.objects.create(usage=month_ledger["rows"][0], attempts=7)
    with CaptureQueriesContext(connection) as before:
        reports.ops_billing_overview(now=now)
    for n in range(4):
        org = OrganizationFactory()
        record(org, resource="gpu:a100", quantity="60", end=now - timedelta(seconds=n), key="more")
        Reconciliation.objects.create(
            organization=org, day=now.date(), resource="gpu:a100", ledger_minor=5, stripe_minor=3
        )
    with CaptureQueriesContext(connection) as after:
        reports.ops_billing_overview(now=now)
    assert len(after) == len(before)


@pytest.mark.django_db
def test_currencies_and_units_keep_apart_in_the_one_query(settings):
    """Groups split by currency, quantity only where a group has one unit, and the daily series
    in the report's currency alone: what the three aggregates said, from one query's cells."""
    settings.BILLING_CURRENCY = "usd"
    org = OrganizationFactory()

    def row(n, *, resource, unit, quantity, amount, currency, day):
        UsageRecord.objects.create(
            organization=org,
            resource=resource,
            quantity=Decimal(quantity),
            unit=unit,
            unit_price=Decimal("0.01"),
            amount_minor=amount,
            currency=currency,
            period_start=at(day) - timedelta(seconds=1),
            period_end=at(day),
            idempotency_key=f"mixed:{n}",
        )

    row(1, resource="gpu:a", unit="gpu_second", quantity="1.5", amount=300, currency="usd", day=2)
    row(2, resource="gpu:a", unit="gpu_second", quantity="2.25", amount=200, currency="usd", day=3)
    row(3, resource="gpu:a", unit="gpu_hour", quantity="1", amount=100, currency="usd", day=3)
    row(4, resource="storage", unit="gb_month", quantity="0.5", amount=40, currency="usd", day=3)
    row(5, resource="gpu:a", unit="gpu_second", quantity="9", amount=900, currency="eur", day=4)
    report = reports.usage_report(
        organization=org, start=START, end=END, group_by="resource", label_key=""
    )
    assert report.currency == "usd" and report.total_minor == 640
    assert [(t.currency, t.amount_minor) for t in report.totals] == [("eur", 900), ("usd", 640)]
    assert [(r.group, r.currency, r.amount_minor, r.quantity, r.unit) for r in report.rows] == [
        ("gpu:a", "eur", 900, Decimal("9.000000"), "gpu_second"),
        ("gpu:a", "usd", 600, None, ""),  # seconds and hours: no one quantity
        ("storage", "usd", 40, Decimal("0.500000"), "gb_month"),
    ]
    assert report.resources == ["gpu:a", "storage"]
    assert [(d.day.day, d.amounts, d.total_minor) for d in report.daily[1:4]] == [
        (2, {"gpu:a": 300, "storage": 0}, 300),
        (3, {"gpu:a": 300, "storage": 40}, 340),
        (4, {"gpu:a": 0, "storage": 0}, 0),  # euros only that day
    ]
    by_day = reports.usage_report(organization=org, start=START, end=END, group_by="day")
    assert [(r.key, r.currency, r.amount_minor) for r in by_day.rows] == [
        ("2026-10-02", "usd", 300),
        ("2026-10-03", "usd", 340),
        ("2026-10-04", "eur", 900),
    ]
