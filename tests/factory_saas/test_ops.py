"""The operators' pages: the overview at /ops/ (its selectors: utilization, workers, queues,
failures; who may see it, what it shows, and that its queries do not grow with the pool), and the
pool and billing pages under it."""

import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from urllib.parse import parse_qs, urlsplit

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from billing.models import MeterPush, Price, Reconciliation
from billing.services import usage_record
from factory_saas.ops.charts import utilization_chart
from factory_saas.templatetags.money import cents
from jobs.models import Job, JobAttempt, JobState, ResourceClass, Worker
from jobs.selectors import (
    ClassUtilization,
    PoolUtilization,
    failing_jobs,
    pool_utilization,
    queue_by_tenant,
    workers_with_jobs,
)
from jobs.services.pool import worker_register
from outbox.models import Message
from tenants.scopes import Role
from tests.billing.ledgers import month_ledger_create, prices_create
from tests.factories import JobFactory, MembershipFactory, OrganizationFactory, UserFactory

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 11, 2, 0, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


def minutes(n: int) -> timedelta:
    return timedelta(minutes=n)


def a100() -> ResourceClass:
    return ResourceClass.objects.get(name="a100-40gb")


def l4() -> ResourceClass:
    return ResourceClass.objects.get(name="l4")


def worker(name, *, resource_class, slots, status=Worker.Status.ONLINE, **fields) -> Worker:
    return Worker.objects.create(
        name=name,
        queue=f"worker.{name}",
        resource_class=resource_class,
        slots=slots,
        status=status,
        **fields,
    )


def ran(job: Job, *, began, ended=None, on=None, number=1) -> JobAttempt:
    """An attempt of `job` that ran from `began` to `ended` (None: still running)."""
    return JobAttempt.objects.create(
        organization=job.organization,
        job=job,
        number=number,
        worker=on,
        started_at=began,
        ended_at=ended,
        outcome=JobAttempt.Outcome.ACTIVE if ended is None else JobAttempt.Outcome.SUCCEEDED,
    )


def job(organization, *, state=JobState.SUCCEEDED, resource_class=None, gpus=1, **fields) -> Job:
    return JobFactory(
        organization=organization,
        state=state,
        resource_class=resource_class or a100(),
        gpu_count=gpus,
        **fields,
    )


# Utilization


def test_two_gpus_busy_for_half_an_hour_on_a_four_slot_worker_is_a_quarter():
    org = OrganizationFactory()
    machine = worker("a100-1", resource_class=a100(), slots=4)
    ran(job(org, gpus=2), began=T0 + minutes(15), ended=T0 + minutes(45), on=machine)

    result = pool_utilization(start=T0, end=T0 + 2 * HOUR, bucket=HOUR, now=T0 + 10 * HOUR)

    assert result.buckets == [T0, T0 + HOUR]
    [row] = result.classes
    assert row.resource_class == "a100-40gb" and row.capacity_slots == 4
    assert row.busy_gpu_seconds == [2 * 1800.0, 0.0]
    assert row.fractions == [0.25, 0.0]


def test_utilization_clips_attempts_to_buckets_and_counts_running_ones_until_now():
    org = OrganizationFactory()
    worker("a100-1", resource_class=a100(), slots=4)
    worker("a100-gone", resource_class=a100(), slots=8, status=Worker.Status.OFFLINE)
    worker("l4-1", resource_class=l4(), slots=2, status=Worker.Status.CORDONED)
    # Began before the window: only its last half hour is inside, in the first bucket.
    ran(job(org, gpus=1), began=T0 - HOUR, ended=T0 + minutes(30))
    # Spans two buckets: 4 GPUs for half of each.
    ran(job(org, gpus=4), began=T0 + minutes(90), ended=T0 + minutes(150))
    # Still running on l4 at now = 3:30, in the current bucket, which has had 30 minutes.
    ran(job(org, gpus=1, resource_class=l4(), state=JobState.RUNNING), began=T0 + 3 * HOUR)
    # Outside the window, or never started: none of it counts.
    ran(job(org, gpus=4), began=T0 - 3 * HOUR, ended=T0 - HOUR)
    JobAttempt.objects.create(
        organization=org, job=job(org, gpus=4, state=JobState.SCHEDULED), number=1
    )

    result = pool_utilization(
        start=T0, end=T0 + 5 * HOUR, bucket=HOUR, now=T0 + 3 * HOUR + minutes(30)
    )

    rows = {row.resource_class: row for row in result.classes}
    assert set(rows) == {"a100-40gb", "l4"}
    assert rows["a100-40gb"].capacity_slots == 4  # the offline worker's 8 slots do not count
    assert rows["a100-40gb"].fractions == [1800 / 14400, 0.5, 0.5, 0.0, None]
    assert rows["l4"].capacity_slots == 2  # a cordoned worker still has its slots
    assert rows["l4"].fractions == [0.0, 0.0, 0.0, 0.5, None]
    assert rows["l4"].peak == 0.5 and rows["l4"].mean == 0.125


def test_utilization_of_a_class_without_capacity_today_is_unknown_not_zero():
    org = OrganizationFactory()
    worker("l4-old", resource_class=l4(), slots=2, status=Worker.Status.OFFLINE)
    ran(job(org, resource_class=l4()), began=T0, ended=T0 + HOUR)

    [row] = pool_utilization(start=T0, end=T0 + HOUR, bucket=HOUR, now=T0 + 2 * HOUR).classes

    assert row.capacity_slots == 0 and row.busy_gpu_seconds == [3600.0]
    assert row.fractions == [None] and row.peak is None


@pytest.mark.parametrize(
    "start, end, bucket",
    [(T0, T0, HOUR), (T0, T0 + HOUR, timedelta(0)), (T0, T0 + timedelta(days=400), HOUR)],
)
def test_utilization_refuses_an_empty_or_unbounded_range(start, end, bucket):
    with pytest.raises(ValueError):
        pool_utilization(start=start, end=end, bucket=bucket, now=T0)


def test_chart_breaks_lines_at_unknown_buckets_and_scales_past_a_full_pool():
    utilization = PoolUtilization(
        start=T0,
        end=T0 + 4 * HOUR,
        bucket=HOUR,
        buckets=[T0 + n * HOUR for n in range(4)],
        classes=[
            ClassUtilization(
                resource_class="a100-40gb",
                capacity_slots=4,
                busy_gpu_seconds=[0.0] * 4,
                fractions=[0.5, None, 1.3, 0.25],
            )
        ],
    )
    chart = utilization_chart(utilization)
    [series] = chart["series"]
    assert len(series["lines"]) == 2 and len(series["points"]) == 3
    assert [tick["percent"] for tick in chart["ticks"]] == [0, 50, 100, 150]
    top, full = chart["ticks"][-1]["y"], chart["ticks"][2]["y"]
    assert top < series["points"][1]["y"] < full  # 130% lies between the 150% and 100% lines
    assert series["peak_percent"] == 130.0
    assert chart["rows"][1]["percents"] == [None]


# Workers, queues, failures


def test_workers_come_with_the_jobs_they_run_now():
    org, other = OrganizationFactory(), OrganizationFactory()
    busy = worker("a100-1", resource_class=a100(), slots=4)
    idle = worker("a100-2", resource_class=a100(), slots=4)
    first = job(org, state=JobState.RUNNING, gpus=2, worker=busy)
    second = job(other, state=JobState.PREEMPTED, gpus=1, worker=busy)
    job(org, state=JobState.SUCCEEDED, gpus=4, worker=busy)  # done: not current
    job(org, state=JobState.QUEUED, gpus=4)

    workers = {w.name: w for w in workers_with_jobs()}

    assert [j.pk for j in workers["a100-1"].current_jobs] == [first.pk, second.pk]
    assert [j.organization.name for j in workers["a100-1"].current_jobs] == [org.name, other.name]
    assert workers["a100-1"].busy_gpus == 3
    assert workers[idle.name].current_jobs == [] and workers[idle.name].busy_gpus == 0


def test_queue_per_tenant_counts_jobs_gpus_and_waiting_reasons():
    busy_org = OrganizationFactory(name="Busy")
    quiet_org = OrganizationFactory(name="Quiet")
    running_only = OrganizationFactory(name="Running only")
    quota = "over quota: 4 of 4 a100-40gb GPUs held"
    for gpus in (1, 2):
        job(busy_org, state=JobState.QUEUED, gpus=gpus, waiting_reason=quota)
    job(busy_org, state=JobState.QUEUED, gpus=4, waiting_reason="")
    job(quiet_org, state=JobState.QUEUED, gpus=8, waiting_reason="no a100-40gb free")
    job(running_only, state=JobState.RUNNING, gpus=2)
    job(quiet_org, state=JobState.FAILED)

    queues = queue_by_tenant()

    assert [(t["name"], t["queued"], t["gpus"]) for t in queues] == [
        ("Busy", 3, 7),
        ("Quiet", 1, 8),
    ]
    assert queues[0]["reasons"] == [(quota, 2), ("(no reason yet)", 1)]
    assert queues[1]["reasons"] == [("no a100-40gb free", 1)]
    assert queues[0]["organization_id"] == busy_org.pk


def test_failing_jobs_lists_recent_failures_and_counts_them_per_tenant():
    now = timezone.now()
    org, other = OrganizationFactory(name="Often"), OrganizationFactory(name="Once")
    newest = job(org, state=JobState.FAILED, finished_at=now - minutes(5), failure_reason="OOM")
    older = job(org, state=JobState.FAILED, finished_at=now - HOUR, failure_reason="NaN loss")
    job(other, state=JobState.FAILED, finished_at=now - 2 * HOUR, failure_reason="lost")
    job(other, state=JobState.FAILED, finished_at=now - timedelta(days=2))  # before the window
    job(other, state=JobState.SUCCEEDED, finished_at=now - minutes(1))

    failing = failing_jobs(since=now - timedelta(hours=24), limit=2)

    assert [j.pk for j in failing.jobs] == [newest.pk, older.pk]
    assert [(t["name"], t["failures"]) for t in failing.per_tenant] == [("Often", 2), ("Once", 1)]
    assert failing.total == 3


# The page


@pytest.fixture
def ops_world(settings):
    """2-3 tenants with workers, jobs in several states, an attempt an hour ago, the month's
    ledger and one stuck meter event. Grows with `add(n)` for the query-count test."""
    settings.STRIPE_SECRET_KEY = ""  # no outbox rows of its own: the test plants a stuck one
    Price.objects.create(
        resource="gpu:a100-40gb",
        unit="gpu_second",
        unit_price=Decimal("0.0010"),
        effective_from=datetime(2020, 1, 1, tzinfo=UTC),
    )
    now = timezone.now()
    last_hour = now.replace(minute=0, second=0, microsecond=0) - HOUR
    world = {"now": now, "last_hour": last_hour, "orgs": [], "rows": [], "jobs": []}

    def add(n: int, tag: str):
        for i in range(n):
            org = OrganizationFactory(name=f"Tenant {tag}{i}")
            machine = worker(f"gpu-{tag}{i}", resource_class=a100(), slots=4)
            running = job(org, state=JobState.RUNNING, gpus=2, worker=machine)
            # 2 GPUs of 4 slots for half of last hour: 25% while this worker is the only one.
            ran(running, began=last_hour + minutes(15), ended=last_hour + minutes(45), on=machine)
            queued = job(org, state=JobState.QUEUED, gpus=1, waiting_reason="no a100-40gb free")
            failed = job(
                org,
                state=JobState.FAILED,
                finished_at=now - minutes(10),
                failure_reason=f"CUDA out of memory {tag}{i}",
            )
            row, _ = usage_record(
                organization=org,
                resource="gpu:a100-40gb",
                quantity=Decimal(3600 * (i + 1)),
                unit="gpu_second",
                period_start=now - minutes(2),
                period_end=now - minutes(1),
                idempotency_key=f"ops-test:{org.pk}",
            )
            world["orgs"].append(org)
            world["rows"].append(row)
            world["jobs"] += [running, queued, failed]

    add(1, "a")
    world["add"] = add
    MeterPush.objects.create(usage=world["rows"][0], attempts=5, last_error="Stripe said no")
    return world


@pytest.fixture
def staff_client(client):
    client.force_login(UserFactory(is_staff=True))
    return client


def test_non_staff_get_what_the_pool_page_gives_them(client):
    owner = MembershipFactory(organization=OrganizationFactory(), role=Role.OWNER).user
    client.force_login(owner)
    pool = client.get(reverse("ops_pool"))
    response = client.get(reverse("ops_overview"))
    assert response.status_code == pool.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))
    assert f'href="{reverse("ops_overview")}"' not in client.get(reverse("tenants:profile")).text


def test_anonymous_visitors_are_sent_to_log_in(client):
    response = client.get(reverse("ops_overview"), follow=True)
    final, status = response.redirect_chain[-1]
    assert status == 302
    assert urlsplit(final).path == reverse("account_login")
    assert parse_qs(urlsplit(final).query)["next"] == [reverse("ops_overview")]
    assert response.status_code == 200


def test_staff_see_every_section(ops_world, staff_client):
    response = staff_client.get(reverse("ops_overview"))
    assert response.status_code == 200
    html = response.content.decode()
    org = ops_world["orgs"][0]
    running, _queued, failed = ops_world["jobs"]
    last_hour = ops_world["last_hour"]

    # Utilization: the SVG chart and, in its table, last hour's 25%.
    assert '<svg class="usage-chart" viewBox="0 0 ' in html
    assert 'id="ops-util-title"' in html and 'id="ops-util-desc"' in html
    assert f'<th scope="row">{last_hour:%Y-%m-%d %H:%M}</th><td>25%</td>' in html
    # Workers and their current jobs, with admin links.
    worker_pk = Worker.objects.get(name="gpu-a0").pk
    assert reverse("admin:jobs_worker_change", args=[worker_pk]) in html
    assert reverse("admin:jobs_job_change", args=[running.pk]) in html
    assert "2/4" in html
    # The queue per tenant, linked to the organization in the admin.
    assert reverse("admin:tenants_organization_change", args=[org.pk]) in html
    assert "<li><strong>1</strong> no a100-40gb free</li>" in html
    # Failing jobs.
    assert reverse("admin:jobs_job_change", args=[failed.pk]) in html
    assert "CUDA out of memory a0" in html
    # Money: revenue, top spenders, the stuck outbox with its admin filter.
    revenue = sum(row.amount_minor for row in ops_world["rows"])
    assert revenue > 0 and f"<strong>{cents(revenue)}</strong>" in html
    assert f">{org.name}</a>" in html
    assert "<strong>1</strong> pending" in html
    assert reverse("admin:billing_meterpush_changelist") + "?stuck=yes" in html
    # The detailed pages.
    assert f'href="{reverse("ops_pool")}"' in html and f'href="{reverse("ops_billing")}"' in html


def test_staff_see_the_outbox_messages_given_up_or_owed_too_long(admin_client):
    now = timezone.now()
    owed = {"handler": "tenants.services.invitation_mail_send", "payload": {"invitation_id": 1}}
    dead = Message.objects.create(**owed, state=Message.State.DEAD, last_error="KeyError: 'x'")
    Message.objects.create(**owed, created_at=now - minutes(10), owed_since=now - minutes(10))
    Message.objects.create(**owed, created_at=now - minutes(4), owed_since=now - minutes(4))
    # Written long ago, but an operator asked for another try a minute ago.
    Message.objects.create(**owed, created_at=now - HOUR, owed_since=now - minutes(1))
    Message.objects.create(**owed, state=Message.State.SENT, created_at=now - HOUR)

    html = admin_client.get(reverse("ops_overview")).content.decode()

    assert "<strong>1</strong> given up, <strong>1</strong> owed for over 5 minutes" in html
    changelist = reverse("admin:outbox_message_changelist")
    assert f'href="{changelist}?state__exact=dead"' in html
    assert f'href="{changelist}?state__exact=pending"' in html
    given_up = admin_client.get(f"{changelist}?state__exact=dead").content.decode()
    assert reverse("admin:outbox_message_change", args=[dead.pk]) in given_up


def test_overview_chart_draws_its_grid_and_legend(ops_world, staff_client):
    response = staff_client.get(reverse("ops_overview"))
    html = response.content.decode()
    buckets = response.context["utilization"].buckets
    grid = re.search(r'<g class="usage-chart-grid" aria-hidden="true">(.*?)</g>', html, re.S)[1]
    percents = re.findall(r'dominant-baseline="middle">([^<]*)</text>', grid)
    assert percents == ["0%", "25%", "50%", "75%", "100%"]
    # 24 hours, at most six labels: every fourth hour.
    hours = re.findall(r'y="214" text-anchor="middle">([^<]*)</text>', grid)
    assert hours == [f"{at:%H:%M}" for at in buckets[::4]]
    legend = re.search(r'<ul class="chart-legend" aria-label="Legend">(.*?)</ul>', html, re.S)[1]
    [(colour, name, note)] = re.findall(
        r'fill="(#\w{6})"/></svg> ([^<]*) <span class="muted">([^<]*)</span>', legend
    )
    assert (colour, name) == ("#0072B2", "a100-40gb")
    assert note.startswith("4 slots, avg ") and note.endswith(", peak 25%")


def test_page_queries_do_not_grow_with_jobs_workers_or_tenants(ops_world, staff_client):
    url = reverse("ops_overview")
    staff_client.get(url)  # warm the session and the content types
    with CaptureQueriesContext(connection) as small:
        assert staff_client.get(url).status_code == 200
    ops_world["add"](4, "b")
    with CaptureQueriesContext(connection) as large:
        response = staff_client.get(url)
    assert response.status_code == 200
    assert "CUDA out of memory b3" in response.content.decode()  # the new rows are on the page
    assert len(large) == len(small), [q["sql"] for q in large.captured_queries]


def test_staff_menu_links_to_the_operations_overview(staff_client):
    html = staff_client.get(reverse("tenants:profile")).content.decode()
    assert f'<a href="{reverse("ops_overview")}">Operations</a>' in html
    assert f'href="{reverse("ops_pool")}"' in html and f'href="{reverse("ops_billing")}"' in html


def test_a_large_pool_shows_the_workers_needing_attention_first_and_few_jobs_each(staff_client):
    org = OrganizationFactory()
    busy = worker("busy", resource_class=a100(), slots=8)
    for _ in range(5):
        job(org, state=JobState.RUNNING, worker=busy, started_at=timezone.now())
    for n in range(30):
        worker(f"idle-{n:02d}", resource_class=a100(), slots=8)
    worker("gone", resource_class=a100(), slots=8, status=Worker.Status.OFFLINE)
    html = staff_client.get("/ops/").content.decode()
    rows = re.findall(r'jobs/worker/\d+/change/" hx-boost="false">([\w-]+)</a>', html)
    assert rows[:2] == ["gone", "busy"] and len(rows) == 25
    assert "32 workers" in html and "Showing 25" in html
    assert len(re.findall(r"/admin/jobs/job/\d+/change/", html)) == 3  # of busy's 5
    assert "all 5 jobs" in html


# The pool and billing pages


@pytest.fixture
def month_ledger(settings):
    settings.STRIPE_SECRET_KEY = ""  # no outbox rows of its own: the tests plant stuck ones
    prices_create()
    return month_ledger_create()


def test_pool_page_is_for_staff(client, owner):
    worker_register(name="cpu-ops", devices=[])
    client.force_login(owner)
    assert client.get(reverse("ops_pool")).status_code == 302
    owner.is_staff = True
    owner.save()
    page = client.get(reverse("ops_pool"))
    assert page.status_code == 200 and b"cpu-ops" in page.content


def test_ops_billing_page_is_refused_to_non_staff(month_ledger, client):
    owner = MembershipFactory(organization=month_ledger["orgs"][0], role=Role.OWNER).user
    client.force_login(owner)
    response = client.get(reverse("ops_billing"))
    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]
    client.logout()
    assert client.get(reverse("ops_billing")).status_code == 302


def test_ops_billing_page_shows_the_figures_to_staff(month_ledger, client):
    now = month_ledger["now"]
    org = month_ledger["orgs"][2]
    stuck = month_ledger["rows"][0]
    MeterPush.objects.create(usage=stuck, attempts=6, last_error="Stripe said no")
    Reconciliation.objects.create(
        organization=org, day=now.date(), resource="gpu:a100", ledger_minor=1234, stripe_minor=1000
    )
    Reconciliation.objects.create(
        organization=org, day=now.date(), resource="storage", ledger_minor=77, stripe_minor=77
    )
    staff = UserFactory(is_staff=True)
    client.force_login(staff)
    response = client.get(reverse("ops_billing"))
    assert response.status_code == 200
    html = response.content.decode()
    revenue = sum(row.amount_minor for row in month_ledger["rows"])
    assert f"<strong>{cents(revenue)}</strong>" in html
    assert reverse("admin:tenants_organization_change", args=[org.pk]) in html
    assert f"usage {stuck.pk} of {stuck.organization.name}" in html
    assert "Stripe said no" in html
    assert reverse("admin:billing_meterpush_changelist") + "?stuck=yes" in html
    assert "<strong>1</strong> pending" in html
    assert cents(234) in html  # the difference; the matching day is not listed
    assert html.count(f">{org.name}</a>") == 2  # once among top tenants, once in differences
    assert "6.00" in html  # a100 GPU-hours
