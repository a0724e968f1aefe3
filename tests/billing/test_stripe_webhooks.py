"""Stripe webhooks: verified, applied once, and in any order to the same invoices and standing."""

import json
import random
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from billing import metering, selectors, services, stripe_events, stripe_sync
from billing.models import BillingAccount, Invoice, UsageRecord, WebhookEvent
from tenants import services as tenant_services
from tenants.actors import Actor
from tenants.models import AuditEvent, Organization
from tests.factories import OrganizationFactory, PriceFactory

URL = "/billing/stripe/webhook/"
GPU = "gpu:test-a100"
pytestmark = pytest.mark.django_db


@pytest.fixture
def customer(fake_stripe):
    """An organization that is a Stripe customer with usage pushed: (org, customer id)."""
    PriceFactory(resource=GPU, unit_price=Decimal("0.0010"))
    org = OrganizationFactory()
    start = timezone.now().replace(microsecond=0) - timedelta(hours=2)
    for n in range(3):
        services.usage_record(
            organization=org,
            resource=GPU,
            quantity=Decimal(100 * (n + 1)),
            unit="gpu_second",
            period_start=start,
            period_end=start + timedelta(minutes=n + 1),
            idempotency_key=f"hook:{org.pk}:{n}",
        )
    assert metering.meter_push_due(limit=10).sent == 3
    account = services.billing_account_ensure(organization=org)
    return org, account.stripe_customer_id


def deliver(client, fake, event, *, timestamp=None, secret=None):
    body = json.dumps(event).encode()
    return client.post(
        URL,
        data=body,
        content_type="application/json",
        HTTP_STRIPE_SIGNATURE=fake.sign(body, timestamp=timestamp, secret=secret),
    )


def lifecycle(fake, customer_id, *, invoice_id="in_fake1", paid=True, start=None):
    """One invoice's events as Stripe sends them, a second or so apart (two in one second)."""
    t = start or int(time.time()) - 600
    draft = fake.invoice(customer=customer_id, invoice_id=invoice_id, status="draft")
    number = f"FS-{invoice_id.removeprefix('in_fake')}"
    opened = fake.invoice(customer=customer_id, invoice_id=invoice_id, status="open", number=number)
    events = [
        fake.event("invoice.created", draft, created=t),
        fake.event("invoice.finalized", opened, created=t + 1),
        fake.event("invoice.payment_failed", opened, created=t + 2),
        fake.event("invoice.updated", opened, created=t + 2),
    ]
    if paid:
        closed = fake.invoice(
            customer=customer_id, invoice_id=invoice_id, status="paid", number=number, paid_at=t + 5
        )
        events.append(fake.event("invoice.paid", closed, created=t + 5))
    return events


def state(org):
    org.refresh_from_db()
    account = selectors.billing_account_get(organization=org)
    invoices = [
        (
            i.stripe_id,
            i.number,
            i.status,
            i.subtotal_minor,
            i.credits_minor,
            i.total_minor,
            i.hosted_url,
            i.paid_at,
            [(line.description, line.resource, line.amount_minor) for line in i.lines.all()],
        )
        for i in Invoice.objects.filter(organization=org).order_by("stripe_id")
    ]
    return invoices, org.status, account.past_due_since


def reset(org):
    Invoice.objects.all().delete()
    WebhookEvent.objects.all().delete()
    stripe_events.past_due_clear(
        account=BillingAccount.objects.select_related("organization").get(organization=org)
    )


def test_a_bad_signature_is_refused_with_no_effect(client, fake_stripe, customer):
    org, customer_id = customer
    event = lifecycle(fake_stripe, customer_id)[2]

    response = deliver(client, fake_stripe, event, secret="whsec_someone_else")

    assert response.status_code == 400
    assert response.json()["code"] == "bad_signature"
    assert not WebhookEvent.objects.exists()
    assert not Invoice.objects.exists()
    org.refresh_from_db()
    assert org.status == Organization.Status.ACTIVE


def test_a_signature_older_than_the_tolerance_is_refused(client, fake_stripe, customer):
    _org, customer_id = customer
    event = lifecycle(fake_stripe, customer_id)[2]

    response = deliver(client, fake_stripe, event, timestamp=int(time.time()) - 301)

    assert response.status_code == 400
    assert not WebhookEvent.objects.exists()
    assert deliver(client, fake_stripe, event, timestamp=int(time.time()) - 10).status_code == 200


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'{"object": "event"}'])
def test_a_signed_body_that_is_not_an_event_is_refused(client, fake_stripe, body):
    response = client.post(
        URL,
        data=body,
        content_type="application/json",
        HTTP_STRIPE_SIGNATURE=fake_stripe.sign(body),
    )
    assert response.status_code == 400
    assert not WebhookEvent.objects.exists()


def test_missing_signature_and_other_methods_are_refused(client, fake_stripe):
    assert client.post(URL, data=b"{}", content_type="application/json").status_code == 400
    assert client.get(URL).status_code == 405


def test_the_same_event_delivered_ten_times_has_one_effect(client, fake_stripe, customer):
    org, customer_id = customer
    failed = lifecycle(fake_stripe, customer_id)[2]

    answers = [deliver(client, fake_stripe, failed) for _ in range(10)]

    assert [a.status_code for a in answers] == [200] * 10
    assert [a.json()["duplicate"] for a in answers] == [False] + [True] * 9
    assert WebhookEvent.objects.count() == 1
    assert Invoice.objects.count() == 1
    assert AuditEvent.objects.filter(organization=org, action="billing.past_due").count() == 1


@pytest.mark.parametrize("seed", range(6))
def test_shuffled_invoice_events_reach_the_same_final_state(client, fake_stripe, customer, seed):
    org, customer_id = customer
    start = int(time.time()) - 3600
    events = lifecycle(fake_stripe, customer_id, invoice_id="in_fakeA", start=start)
    events += lifecycle(fake_stripe, customer_id, invoice_id="in_fakeB", paid=False, start=start)
    events += lifecycle(fake_stripe, customer_id, invoice_id="in_fakeC", start=start + 60)
    for event in events:
        assert deliver(client, fake_stripe, event).status_code == 200
    in_order = state(org)
    reset(org)

    shuffled = events[:]
    random.Random(seed).shuffle(shuffled)  # noqa: S311 (a seeded test order)
    for event in shuffled:
        assert deliver(client, fake_stripe, event).status_code == 200

    assert state(org) == in_order
    invoices, status, since = in_order
    assert [(i[0], i[2]) for i in invoices] == [
        ("in_fakeA", "paid"),
        ("in_fakeB", "open"),
        ("in_fakeC", "paid"),
    ]
    assert status == Organization.Status.PAST_DUE  # B failed and is unpaid
    assert since == datetime.fromtimestamp(start + 2, tz=UTC)


def test_the_mirrored_invoice_matches_stripe_and_the_ledger(client, fake_stripe, customer):
    org, customer_id = customer
    for event in lifecycle(fake_stripe, customer_id):
        deliver(client, fake_stripe, event)

    invoice = Invoice.objects.get(organization=org)
    ledger = sum(
        UsageRecord.objects.filter(organization=org).values_list("amount_minor", flat=True)
    )
    assert invoice.source == Invoice.Source.STRIPE
    assert (invoice.status, invoice.number) == ("paid", "FS-1")
    assert invoice.subtotal_minor == ledger > 0
    # The plan's trial credit sits in the customer's Stripe balance only once pushed.
    assert invoice.total_minor == invoice.subtotal_minor - invoice.credits_minor
    assert invoice.hosted_url.startswith("https://invoice.stripe.test/")
    assert invoice.pdf_url.startswith("https://pay.stripe.test/")
    [line] = invoice.lines.all()
    assert (line.resource, line.amount_minor) == (GPU, ledger)


def test_a_credit_pushed_to_stripe_shows_as_invoice_credits(client, fake_stripe, customer):
    org, customer_id = customer
    stripe_sync.credit_grants_push()
    balance = -fake_stripe.objects["customer"][customer_id]["balance"]
    assert balance > 0
    for event in lifecycle(fake_stripe, customer_id, paid=False)[:2]:
        deliver(client, fake_stripe, event)

    invoice = Invoice.objects.get(organization=org)
    assert invoice.credits_minor == min(balance, invoice.subtotal_minor)
    assert invoice.total_minor == invoice.subtotal_minor - invoice.credits_minor


def test_payment_failure_makes_the_org_past_due_and_payment_restores_it(
    client, fake_stripe, customer, settings
):
    org, customer_id = customer
    events = lifecycle(fake_stripe, customer_id)
    failed_at = datetime.fromtimestamp(events[2]["created"], tz=UTC)
    grace = timedelta(days=settings.BILLING_PAST_DUE_GRACE_DAYS)

    for event in events[:3]:
        deliver(client, fake_stripe, event)

    org.refresh_from_db()
    assert org.status == Organization.Status.PAST_DUE
    assert selectors.billing_account_get(organization=org).past_due_since == failed_at

    def blocks(at):
        return selectors.placement_blocks(organizations=[org], now=at, running_minor={})

    assert blocks(failed_at + grace - timedelta(seconds=1)) == {}
    assert blocks(failed_at + grace) == {org.pk: selectors.PAST_DUE_REASON}

    deliver(client, fake_stripe, events[4])  # invoice.paid

    org.refresh_from_db()
    assert org.status == Organization.Status.ACTIVE
    assert selectors.billing_account_get(organization=org).past_due_since is None
    assert blocks(failed_at + grace) == {}


def test_standing_moves_the_organization_through_tenants_and_never_touches_a_suspension(
    client, fake_stripe, customer
):
    org, customer_id = customer
    events = lifecycle(fake_stripe, customer_id)
    changes = AuditEvent.objects.filter(organization=org, action="organization.status")

    for event in events[:3]:
        deliver(client, fake_stripe, event)
    deliver(client, fake_stripe, events[4])  # invoice.paid

    assert [change.data["status"] for change in changes.order_by("pk")] == [
        ["active", "past_due"],
        ["past_due", "active"],
    ]
    assert changes.order_by("pk").first().data["reason"].startswith("payment failed on ")

    # An operator's suspension is neither replaced by past due nor lifted by a payment.
    tenant_services.organization_status_set(
        organization=org, status="suspended", actor=Actor(), reason="fraud review"
    )
    later = lifecycle(fake_stripe, customer_id, invoice_id="in_fake2")
    for event in later[:3]:
        deliver(client, fake_stripe, event)
    org.refresh_from_db()
    assert org.status == Organization.Status.SUSPENDED
    assert selectors.billing_account_get(organization=org).past_due_since is not None
    deliver(client, fake_stripe, later[4])
    org.refresh_from_db()
    assert org.status == Organization.Status.SUSPENDED
    assert changes.count() == 3


def test_a_failure_arriving_after_the_payment_does_not_make_the_org_past_due(
    client, fake_stripe, customer
):
    org, customer_id = customer
    events = lifecycle(fake_stripe, customer_id)

    deliver(client, fake_stripe, events[4])  # paid first
    deliver(client, fake_stripe, events[2])  # the older failure, late

    org.refresh_from_db()
    assert org.status == Organization.Status.ACTIVE
    assert Invoice.objects.get().status == Invoice.Status.PAID


def test_an_event_for_an_unknown_customer_is_kept_unmatched_and_unprocessed(
    client, fake_stripe, customer
):
    _org, _customer_id = customer
    invoice = fake_stripe.invoice(customer="cus_nobody", status="open")
    event = fake_stripe.event("invoice.finalized", invoice, created=int(time.time()))

    response = deliver(client, fake_stripe, event)

    assert response.status_code == 200
    stored = WebhookEvent.objects.get()
    assert stored.error == "unmatched: unknown customer cus_nobody"
    assert stored.processed_at is None
    assert not Invoice.objects.exists()


def test_events_for_a_customer_not_yet_stored_are_applied_once_it_is(client, fake_stripe, customer):
    """Stripe made the customer but our write of its id was lost; its events came meanwhile."""
    org, customer_id = customer
    BillingAccount.objects.filter(organization=org).update(stripe_customer_id="")
    events = lifecycle(fake_stripe, customer_id, paid=False)
    for event in events:
        assert deliver(client, fake_stripe, event).status_code == 200
    assert deliver(client, fake_stripe, events[2]).json()["duplicate"] is True
    assert not Invoice.objects.exists()
    assert WebhookEvent.objects.filter(processed_at__isnull=True).count() == len(events)

    account = BillingAccount.objects.get(organization=org)
    assert stripe_sync.customer_ensure(account=account) == customer_id  # the retry

    invoice = Invoice.objects.get(organization=org)
    assert (invoice.stripe_id, invoice.status) == ("in_fake1", "open")
    org.refresh_from_db()
    assert org.status == Organization.Status.PAST_DUE
    assert set(WebhookEvent.objects.values_list("error", flat=True)) == {""}
    assert not WebhookEvent.objects.filter(processed_at__isnull=True).exists()
    assert stripe_events.unmatched_events_apply(customer_id=customer_id) == 0  # each applied once
    assert AuditEvent.objects.filter(organization=org, action="billing.past_due").count() == 1


def test_stored_events_carry_their_object_id_and_lookups_do_not_read_payloads(
    client, fake_stripe, customer
):
    org, customer_id = customer
    events = lifecycle(fake_stripe, customer_id, paid=False)

    with CaptureQueriesContext(connection) as queries:
        for event in events:
            deliver(client, fake_stripe, event)

    assert set(WebhookEvent.objects.values_list("object_id", flat=True)) == {"in_fake1"}
    org.refresh_from_db()
    assert org.status == Organization.Status.PAST_DUE  # found through object_id
    payload_filters = [
        q["sql"]
        for q in queries.captured_queries
        if '"billing_webhookevent"."payload" ->' in q["sql"]
        or '"billing_webhookevent"."payload" #>' in q["sql"]
    ]
    assert payload_filters == []


def test_other_events_are_stored_and_ignored(client, fake_stripe):
    event = fake_stripe.event("customer.created", {"id": "cus_x", "object": "customer"}, created=1)
    assert deliver(client, fake_stripe, event).status_code == 200
    assert WebhookEvent.objects.get().error == ""
