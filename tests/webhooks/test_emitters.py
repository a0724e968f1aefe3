"""Each event source owes its event through its own service, in the transaction that makes the
change, and the receiver gets it signed: jobs ending, model versions and aliases, budgets,
invoices, deployments."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import transaction
from django.utils import timezone
from standardwebhooks import Webhook

from billing.invoicing import invoice_mark_paid
from billing.models import BillingAccount, Invoice
from billing.services import billing_account_ensure, budget_alerts_check, budget_set, usage_record
from billing.stripe_events import event_receive
from jobs.models import ResourceClass
from jobs.scheduler.apply import scheduler_pass
from jobs.services.attempts import attempt_claim, attempt_finish
from jobs.services.pool import worker_register
from jobs.services.submission import job_cancel
from registry.services.model_versions import model_alias_delete, model_alias_set
from serving.services import deployment_create
from tenants.actors import Actor
from tests.factories import JobFactory, ModelVersionFactory
from webhooks.models import WebhookEvent
from webhooks.services import webhooks_drain

pytestmark = pytest.mark.django_db


def _received(endpoint, receiver):
    webhooks_drain()
    return [Webhook(endpoint.secret).verify(r.body, r.headers) for r in receiver.received]


def _types(endpoint, receiver):
    return [payload["type"] for payload in _received(endpoint, receiver)]


def _running_job(org):
    worker = worker_register(name="cpu-hooks", devices=[])
    job = JobFactory(organization=org)
    scheduler_pass()
    assert attempt_claim(job_id=job.pk, attempt=1, worker_id=worker.pk) is not None
    return job


def test_a_job_that_succeeds_or_fails_is_told(org, endpoint, receiver):
    done = _running_job(org)
    attempt_finish(job_id=done.pk, attempt=1, outcome="succeeded")
    broken = _running_job(org)
    attempt_finish(job_id=broken.pk, attempt=1, outcome="failed", reason="out of memory")
    payloads = _received(endpoint, receiver)
    by_type = {p["type"]: p["data"]["job"] for p in payloads}
    assert by_type["job.succeeded"]["id"] == done.pk
    assert by_type["job.succeeded"]["state"] == "succeeded"
    assert by_type["job.failed"]["failure_reason"] == "out of memory"
    assert by_type["job.failed"]["id"] == broken.pk


def test_a_cancelled_job_is_told_once(org, owner, endpoint, receiver):
    job = JobFactory(organization=org)
    job_cancel(job=job, actor=Actor(user=owner))
    assert _types(endpoint, receiver) == ["job.cancelled"]


def test_a_preempted_job_is_not_told(org, endpoint, receiver):
    job = _running_job(org)
    attempt_finish(job_id=job.pk, attempt=1, outcome="stopped")
    assert _types(endpoint, receiver) == []


def test_a_change_that_rolls_back_owes_nothing(org, owner, endpoint, receiver):
    job = JobFactory(organization=org)
    with pytest.raises(RuntimeError), transaction.atomic():
        job_cancel(job=job, actor=Actor(user=owner))
        raise RuntimeError("the caller's transaction fails after the cancel")
    assert not WebhookEvent.objects.filter(organization=org).exists()
    assert _types(endpoint, receiver) == []


def test_a_new_model_version_and_alias_moves_are_told(org, owner, endpoint, receiver):
    from registry.services.model_versions import _record_model_version

    first = ModelVersionFactory(organization=org)
    model = first.registered_model
    version = _record_model_version(
        registered_model=model,
        stored={},
        actor=Actor(user=owner),
        trained_on=[],
        recipe_name="tabular-classifier",
        metrics={"val_accuracy": 0.9},
    )
    alias = model_alias_set(
        registered_model=model, alias="production", version=version, actor=Actor(user=owner)
    )
    model_alias_delete(alias=alias, actor=Actor(user=owner))
    payloads = _received(endpoint, receiver)
    assert [p["type"] for p in payloads] == [
        "model.version_created",
        "model.alias_moved",
        "model.alias_moved",
    ]
    created, moved, removed = (p["data"] for p in payloads)
    assert created["model"] == {"id": model.pk, "name": model.name}
    assert created["version"]["number"] == version.number
    assert created["version"]["metrics"] == {"val_accuracy": 0.9}
    assert (moved["alias"], moved["from_version"], moved["to_version"]) == (
        "production",
        None,
        version.number,
    )
    assert (removed["from_version"], removed["to_version"]) == (version.number, None)


def test_a_crossed_budget_threshold_is_told_once(org, owner, endpoint, receiver):
    budget_set(
        organization=org,
        actor=Actor(user=owner),
        monthly_budget_minor=10_000,
        thresholds=[50],
        hard_cap=False,
    )
    now = timezone.now()
    usage_record(
        organization=org,
        resource="gpu:a100-40gb",
        quantity=Decimal(6_000) / Decimal("0.08"),
        unit="gpu_second",
        period_start=now - timedelta(hours=1),
        period_end=now,
        idempotency_key=f"hooks:{org.pk}",
    )
    assert budget_alerts_check(now=now) == 1
    assert budget_alerts_check(now=now) == 0
    [payload] = _received(endpoint, receiver)
    assert payload["type"] == "billing.budget_threshold_reached"
    assert payload["data"]["threshold_percent"] == 50
    assert payload["data"]["budget_minor"] == 10_000


def _open_invoice(org):
    start = datetime(2026, 10, 1, tzinfo=UTC)
    return Invoice.objects.create(
        organization=org,
        number=f"HOOK-{org.pk}",
        source=Invoice.Source.BUILTIN,
        status=Invoice.Status.OPEN,
        period_start=start,
        period_end=start + timedelta(days=31),
        subtotal_minor=1234,
        total_minor=1234,
    )


def test_a_builtin_invoice_marked_paid_is_told(org, owner, endpoint, receiver):
    invoice = _open_invoice(org)
    invoice_mark_paid(invoice=invoice, actor=Actor(user=owner))
    [payload] = _received(endpoint, receiver)
    assert payload["type"] == "invoice.paid"
    assert payload["data"]["invoice"]["number"] == invoice.number
    assert payload["data"]["invoice"]["total_minor"] == 1234


def _stripe_event(event_id, type, status, created):
    return {
        "id": event_id,
        "type": type,
        "created": created,
        "data": {
            "object": {
                "id": "in_hooks",
                "customer": "cus_hooks",
                "status": status,
                "number": "ST-1",
                "currency": "usd",
                "subtotal": 500,
                "total": 500,
                "amount_due": 500,
                "lines": {"data": []},
                "status_transitions": {"finalized_at": created, "paid_at": created},
            }
        },
    }


def test_stripe_payment_failed_then_paid_is_told_once_each(org, endpoint, receiver):
    billing_account_ensure(organization=org)
    BillingAccount.objects.filter(organization=org).update(stripe_customer_id="cus_hooks")
    now = int(timezone.now().timestamp())
    failed = _stripe_event("evt_1", "invoice.payment_failed", "open", now)
    event_receive(payload=failed)
    event_receive(payload=failed)  # Stripe delivers again: nothing more owed
    event_receive(payload=_stripe_event("evt_2", "invoice.paid", "paid", now + 1))
    event_receive(payload=_stripe_event("evt_3", "invoice.updated", "paid", now + 2))
    payloads = _received(endpoint, receiver)
    assert [p["type"] for p in payloads] == ["invoice.payment_failed", "invoice.paid"]
    assert payloads[1]["data"]["invoice"]["source"] == "stripe"


def test_a_new_deployment_is_told(org, owner, endpoint, receiver):
    deployment = deployment_create(
        organization=org,
        name="hooked",
        recipe="tabular-classifier",
        resource_class=ResourceClass.objects.get(name="cpu"),
        actor=Actor(user=owner),
    )
    [payload] = _received(endpoint, receiver)
    assert payload["type"] == "deployment.created"
    assert payload["data"]["deployment"] == {"id": deployment.pk, "name": "hooked"}


def test_an_organization_is_told_only_its_own_events(org, other_org, endpoint, receiver):
    JobFactory(organization=other_org)
    job_cancel(job=JobFactory(organization=other_org), actor=Actor())
    assert _types(endpoint, receiver) == []
    assert not WebhookEvent.objects.filter(organization=org).exists()
