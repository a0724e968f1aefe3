"""A month in fast-forward: jobs run, storage and predictions are metered, meter events reach
(the local) Stripe exactly once, Stripe's invoice comes back by webhook and shows on the billing
page, and the usage report equals the ledger to the cent."""

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db.models import Sum
from django.utils import timezone

from billing import metering
from billing.models import Invoice, MeterPush, Plan, UsageRecord
from billing.services import billing_account_ensure, plan_change, storage_meter, usage_record
from jobs.models import JobAttempt, JobState, ResourceClass
from jobs.scheduler.apply import scheduler_pass
from jobs.services.attempts import attempt_claim, attempt_finish
from jobs.services.pool import worker_register
from registry.models import StorageAccount
from tenants.actors import Actor
from tests.factories import JobFactory

pytestmark = pytest.mark.django_db

A100 = {"name": "NVIDIA A100-SXM4-40GB", "memory_gb": 40}


def _run_jobs(org, owner, hours: list[float]) -> None:
    """Each job placed by the scheduler, claimed by the worker, run for `hours`, finished."""
    worker = worker_register(name="gpu-month", devices=[A100] * 4)
    a100 = ResourceClass.objects.get(name="a100-40gb")
    for n, length in enumerate(hours):
        job = JobFactory(
            organization=org,
            created_by=owner,
            resource_class=a100,
            gpu_count=2,
            labels={"project": "fraud" if n % 2 else "churn"},
            output_model_name=f"model-{n % 2}",
        )
        scheduler_pass()
        assert attempt_claim(job_id=job.pk, attempt=1, worker_id=worker.pk) is not None
        # Fast-forward: the attempt started `length` hours ago.
        JobAttempt.objects.filter(job=job, number=1).update(
            started_at=timezone.now() - timedelta(hours=length)
        )
        finished = attempt_finish(job_id=job.pk, attempt=1, outcome="succeeded")
        assert finished.state == JobState.SUCCEEDED


def _meter_the_month(org, month_start: datetime, now: datetime) -> None:
    StorageAccount.objects.filter(organization=org).update(used_bytes=37 * 10**9)
    hour = month_start
    while hour + timedelta(hours=1) <= now:
        storage_meter(hour=hour)
        hour += timedelta(hours=1)
    day = month_start
    while day < now:
        usage_record(
            organization=org,
            resource="predictions",
            quantity=Decimal(1234 + day.day * 17) / 1000,
            unit="1k_predictions",
            period_start=day,
            period_end=day,
            idempotency_key=f"predict-day:{org.pk}:{day:%Y-%m-%d}",
            model_name="model-1",
        )
        day += timedelta(days=1)


def _push_everything() -> int:
    sent = 0
    while (result := metering.meter_push_due()).claimed:
        assert not result.failed, result.errors
        sent += result.sent
    return sent


def _deliver(client, fake, event):
    body = json.dumps(event).encode()
    return client.post(
        "/billing/stripe/webhook/",
        data=body,
        content_type="application/json",
        HTTP_STRIPE_SIGNATURE=fake.sign(body),
    )


def test_a_month_is_metered_billed_once_invoiced_and_reported_to_the_cent(
    stripe_server, fake_stripe, org, owner, client_for
):
    now = timezone.now()
    # The last 30 days, whatever today's date (Stripe takes meter events up to 35 days old).
    month_start = (now - timedelta(days=30)).replace(minute=0, second=0, microsecond=0)
    account = billing_account_ensure(organization=org)
    plan_change(organization=org, plan=Plan.objects.get(code="payg"), actor=Actor(user=owner))

    _run_jobs(org, owner, hours=[1.5, 0.25, 3.0])
    _meter_the_month(org, month_start, now)

    ledger = UsageRecord.objects.for_organization(org)
    ledger_total = ledger.aggregate(total=Sum("amount_minor"))["total"]
    due = MeterPush.objects.filter(usage__organization=org, state=MeterPush.State.PENDING).count()
    assert ledger.filter(resource="gpu:a100-40gb").count() == 3
    assert ledger.filter(resource="storage").count() == 30 * 24  # every hour of the month
    # A row whose amount rounds to nothing yet (most storage hours) has nothing to send.
    assert due == ledger.filter(amount_minor__gt=0).count()

    # Meter events reach Stripe exactly once, their values add up to the ledger.
    assert _push_everything() == due
    assert _push_everything() == 0
    account.refresh_from_db()
    customer = account.stripe_customer_id
    identifiers = [event["identifier"] for event in fake_stripe.meter_events]
    assert len(identifiers) == len(set(identifiers)) == due
    assert fake_stripe.meter_total(customer=customer) == ledger_total

    # Stripe invoices the period and tells us by webhook; the billing page shows it.
    invoice = fake_stripe.invoice(
        customer=customer,
        invoice_id="in_month",
        status="paid",
        number="FAKE-0001",
        period_start=int(month_start.timestamp()),
        paid_at=int(now.timestamp()),
    )
    client = client_for(owner)
    created = int(now.timestamp())
    for kind in ("invoice.finalized", "invoice.paid"):
        response = _deliver(client, fake_stripe, fake_stripe.event(kind, invoice, created=created))
        assert response.status_code == 200, response.content
    mirrored = Invoice.objects.for_organization(org).get(stripe_id="in_month")
    assert (mirrored.status, mirrored.subtotal_minor) == (Invoice.Status.PAID, ledger_total)
    page = client.get(f"/o/{org.slug}/billing/").content.decode()
    assert "FAKE-0001" in page

    # The usage report's totals equal the ledger's to the cent, however it is grouped.
    for group_by in ("resource", "day", "model", "label"):
        report = client.get(
            f"/api/v1/orgs/{org.slug}/billing/usage/",
            {
                "start": month_start.date().isoformat(),
                "end": now.astimezone(UTC).date().isoformat(),
                "group_by": group_by,
                "label_key": "project",
            },
        ).json()
        assert report["total_minor"] == ledger_total, group_by
        assert sum(row["amount_minor"] for row in report["rows"]) == ledger_total, group_by
        if group_by == "resource":
            assert {row["group"] for row in report["rows"]} == {
                "gpu:a100-40gb",
                "storage",
                "predictions",
            }
