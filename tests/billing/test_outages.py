"""Billing's side effects survive the part they need being down: a webhook's follow-up through a
broker outage, a plan change's Stripe sync through a broker outage, a budget alert's e-mail
through an SMTP outage. Each is owed in the transaction that makes the change and delivered
once the part is back."""

import json
import logging
from datetime import timedelta
from decimal import Decimal

import pytest
from django.test import Client
from django.utils import timezone

from billing import services, stripe_sync, tasks
from billing.models import Plan
from outbox.models import Message
from outbox.services import outbox_drain
from tenants.actors import Actor
from tenants.scopes import Role
from tests.factories import MembershipFactory, OrganizationFactory, PriceFactory
from tests.pool import Pool
from tests.processes import wait_for

WEBHOOK = "/billing/stripe/webhook/"
FOLLOW_UP = "billing.stripe_events.payment_method_default"


def _deliver(client, fake, event):
    body = json.dumps(event).encode()
    return client.post(
        WEBHOOK, data=body, content_type="application/json", HTTP_STRIPE_SIGNATURE=fake.sign(body)
    )


@pytest.mark.django_db(transaction=True)
def test_a_checkout_webhook_during_a_broker_outage_is_answered_and_followed_up_once_it_is_back(
    stripe_server, broker_down, tmp_path, client_for
):
    fake = stripe_server.fake
    PriceFactory(resource="gpu:test-a100", unit_price=Decimal("0.0010"))
    org = OrganizationFactory()
    owner = MembershipFactory(organization=org, role=Role.OWNER).user
    assert (
        client_for(owner)
        .post(f"/api/v1/orgs/{org.slug}/billing/checkout/", {}, format="json")
        .status_code
        == 200
    )
    [session] = fake.objects["checkout_session"]
    completed = fake.checkout_complete(session)
    saved = fake.objects["setup_intent"][completed["setup_intent"]]["payment_method"]
    customer_id = completed["customer"]
    event = fake.event("checkout.session.completed", completed, created=1_790_000_000)
    stripe_side = Client(raise_request_exception=False)

    answered = _deliver(stripe_side, fake, event)
    # Stripe retries whatever it was not answered 2xx; a retry must not apply it again.
    retried = _deliver(stripe_side, fake, event)

    assert answered.status_code == 200, answered.content
    assert (retried.status_code, retried.json()["duplicate"]) == (200, True)
    assert "invoice_settings" not in fake.objects["customer"][customer_id]

    broker_down.start()
    pool = Pool(tmp_path)
    pool.env.update(
        OUTBOX_DRAIN_EVERY_S="0.5",
        STRIPE_SECRET_KEY=fake.api_key,
        STRIPE_WEBHOOK_SECRET=fake.webhook_secret,
        STRIPE_API_BASE=stripe_server.url,
        STRIPE_TIMEOUT_S="5",
    )
    try:
        pool.start_control_plane()
        wait_for(
            lambda: fake.objects["customer"][customer_id].get("invoice_settings"),
            timeout=90,
            what="a worker to make the saved card the invoice default",
        )
        wait_for(
            lambda: Message.objects.filter(handler=FOLLOW_UP, state=Message.State.SENT).exists(),
            timeout=30,
            what="the follow-up to be marked sent",
        )
    except AssertionError:
        print(pool.logs())
        raise
    finally:
        pool.stop()

    assert fake.objects["customer"][customer_id]["invoice_settings"] == {
        "default_payment_method": saved
    }
    assert _deliver(stripe_side, fake, event).json()["duplicate"] is True
    outbox_drain(now=timezone.now() + timedelta(days=1))  # whatever is still owed
    [follow_up] = Message.objects.filter(handler=FOLLOW_UP)
    assert (follow_up.state, follow_up.attempts) == (Message.State.SENT, 1)
    assert fake.requests.count(("POST", f"/v1/customers/{customer_id}")) == 1


def _fee_amounts(fake, subscription_id):
    return [
        item["price"]["unit_amount"]
        for item in fake.objects["subscription"][subscription_id]["items"]["data"]
        if (item["price"]["recurring"] or {}).get("usage_type") != "metered"
    ]


@pytest.mark.django_db(transaction=True)
def test_a_plan_change_during_a_broker_outage_reaches_the_stripe_subscription(
    fake_stripe, broker_down, caplog
):
    PriceFactory(resource="gpu:test-a100", unit_price=Decimal("0.0010"))
    org = OrganizationFactory()
    account = services.billing_account_ensure(organization=org)
    subscription_id = stripe_sync.subscription_ensure(account=account)
    assert _fee_amounts(fake_stripe, subscription_id) == []

    # A transactional test starts without the plans the migrations made.
    team, _ = Plan.objects.get_or_create(
        code="team", defaults={"name": "Team", "monthly_fee_minor": 50_000}
    )

    with caplog.at_level(logging.WARNING, logger="outbox.services"):
        services.plan_change(organization=org, plan=team, actor=Actor())
    assert "waits for the next drain" in caplog.text  # the broker really was down

    broker_down.start()
    # Everything beat runs that could deliver it: the Stripe push (with its safety net for
    # accounts without a subscription) and the outbox drain.
    tasks.meter_push()
    outbox_drain(now=timezone.now() + timedelta(minutes=1))
    assert _fee_amounts(fake_stripe, subscription_id) == [50_000]


@pytest.mark.django_db
def test_a_budget_alert_raised_while_smtp_is_down_is_mailed_once_smtp_listens(
    org, owner, smtp_down
):
    services.budget_set(
        organization=org,
        actor=Actor(user=owner),
        monthly_budget_minor=10_000,
        thresholds=[80],
        hard_cap=False,
    )
    now = timezone.now()
    services.usage_record(
        organization=org,
        resource="gpu:a100-40gb",
        quantity=Decimal(9_000) / Decimal("0.08"),
        unit="gpu_second",
        period_start=now - timedelta(hours=1),
        period_end=now,
        idempotency_key=f"spend:{org.pk}",
    )

    assert services.budget_alerts_check(now=now) == 1
    outbox_drain(now=now)  # SMTP still down: the e-mail stays owed

    with smtp_down.listen():
        outbox_drain(now=now + timedelta(hours=2))  # the retry, after its backoff

    [envelope] = smtp_down.envelopes
    assert envelope.rcpt_tos == [owner.email]
    assert "80% of this month's budget used" in envelope.content.decode()
    assert services.budget_alerts_check(now=now) == 0
    outbox_drain(now=now + timedelta(days=1))
    assert len(smtp_down.envelopes) == 1
