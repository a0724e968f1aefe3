"""Deliveries: signed per Standard Webhooks (verified with the reference library), retried with
backoff through a receiver that fails then recovers, never sent twice after a 2xx, resent and
test-sent on request, and an endpoint failing for the whole give-up age disabled with a mail."""

import json
from datetime import timedelta

import pytest
from django.core import mail
from django.db import transaction
from django.utils import timezone
from standardwebhooks import Webhook, WebhookVerificationError

from outbox.services import outbox_drain
from tenants.actors import Actor
from tests.factories import MembershipFactory
from webhooks.models import WebhookDelivery, WebhookEndpoint
from webhooks.services import (
    delivery_attempt,
    delivery_resend,
    endpoint_secret_rotate,
    endpoint_test_send,
    endpoint_update,
    event_publish,
    webhook_log_expire,
    webhooks_drain,
)

pytestmark = pytest.mark.django_db


def _publish(org, type="job.succeeded", **data):
    with transaction.atomic():
        return event_publish(organization=org, type=type, data=data or {"job": {"id": 1}})


def _verify(secret, received):
    return Webhook(secret).verify(received.body, received.headers)


def test_delivery_is_signed_and_verifies_with_the_reference_library(org, endpoint, receiver):
    event = _publish(org, job={"id": 7, "state": "succeeded"})
    assert webhooks_drain() == 1
    [received] = receiver.received
    payload = _verify(endpoint.secret, received)
    assert payload["type"] == "job.succeeded"
    assert payload["data"] == {"job": {"id": 7, "state": "succeeded"}}
    assert payload["timestamp"] == event.payload["timestamp"]
    delivery = WebhookDelivery.objects.get(event=event)
    assert received.headers["webhook-id"] == delivery.message_id
    with pytest.raises(WebhookVerificationError):
        _verify("whsec_" + "A" * 43 + "=", received)
    with pytest.raises(WebhookVerificationError):
        Webhook(endpoint.secret).verify(received.body + b" ", received.headers)


def test_rotation_signs_with_both_secrets_during_the_overlap(org, owner, endpoint, receiver):
    new_secret = endpoint_secret_rotate(endpoint=endpoint, actor=Actor(user=owner))
    assert new_secret != endpoint.secret
    _publish(org)
    webhooks_drain()
    received = receiver.received[-1]
    assert len(received.headers["webhook-signature"].split(" ")) == 2
    _verify(endpoint.secret, received)
    _verify(new_secret, received)


def test_after_the_overlap_only_the_new_secret_signs(org, owner, endpoint, receiver):
    new_secret = endpoint_secret_rotate(endpoint=endpoint, actor=Actor(user=owner), overlap_s=0)
    _publish(org)
    webhooks_drain()
    received = receiver.received[-1]
    _verify(new_secret, received)
    with pytest.raises(WebhookVerificationError):
        _verify(endpoint.secret, received)


def test_receiver_that_fails_then_recovers_gets_every_event_once(org, endpoint, receiver):
    """Three events; the receiver answers 500, times out as a refusal, then recovers. Every
    event arrives with a 2xx exactly once, each try with the same webhook-id."""
    receiver.statuses = [500, 503, 502, 500, 200]
    events = [_publish(org, job={"id": n}) for n in range(3)]
    now = timezone.now()
    for _ in range(10):
        webhooks_drain(now=now)
        now += timedelta(hours=1)  # past every backoff step so far
    answered_ok = [r for r in receiver.received if r.answered == 200]
    ids_ok = [r.headers["webhook-id"] for r in answered_ok]
    assert sorted(ids_ok) == sorted(
        WebhookDelivery.objects.filter(event__in=events).values_list("message_id", flat=True)
    )
    assert len(set(ids_ok)) == 3  # none twice after a 2xx
    assert {json.loads(r.body)["data"]["job"]["id"] for r in answered_ok} == {0, 1, 2}
    for delivery in WebhookDelivery.objects.filter(event__in=events):
        assert delivery.state == WebhookDelivery.State.DELIVERED
        tried = [r for r in receiver.received if r.headers["webhook-id"] == delivery.message_id]
        assert len(tried) == delivery.attempts == delivery.tries.count()
    webhooks_drain(now=now + timedelta(days=1))
    assert len(receiver.received) == 5 + 2  # nothing more was sent


def test_backoff_waits_between_tries(org, endpoint, receiver):
    receiver.statuses = [500]
    _publish(org)
    now = timezone.now()
    webhooks_drain(now=now)
    delivery = WebhookDelivery.objects.get(endpoint=endpoint)
    assert delivery.attempts == 1
    assert delivery.next_attempt_at == now + timedelta(seconds=5)
    assert webhooks_drain(now=now + timedelta(seconds=4)) == 0
    assert len(receiver.received) == 1
    webhooks_drain(now=now + timedelta(seconds=5))
    delivery.refresh_from_db()
    assert delivery.attempts == 2
    assert delivery.next_attempt_at == now + timedelta(seconds=5 + 300)


def test_a_claimed_delivery_is_not_sent_by_a_second_sender(org, endpoint, receiver):
    _publish(org)
    delivery = WebhookDelivery.objects.get(endpoint=endpoint)
    now = timezone.now()
    WebhookDelivery.objects.filter(pk=delivery.pk).update(claimed_until=now + timedelta(seconds=60))
    assert delivery_attempt(delivery_id=delivery.pk, now=now) is False
    assert receiver.received == []
    assert delivery_attempt(delivery_id=delivery.pk, now=now + timedelta(seconds=61)) is True
    assert delivery_attempt(delivery_id=delivery.pk, now=now + timedelta(seconds=62)) is False
    assert len(receiver.received) == 1


def test_resend_sends_again_with_the_same_webhook_id(org, owner, endpoint, receiver):
    _publish(org)
    webhooks_drain()
    delivery = WebhookDelivery.objects.get(endpoint=endpoint)
    delivery_resend(delivery=delivery, actor=Actor(user=owner))
    webhooks_drain()
    assert [r.headers["webhook-id"] for r in receiver.received] == [delivery.message_id] * 2
    delivery.refresh_from_db()
    assert delivery.state == WebhookDelivery.State.DELIVERED and delivery.attempts == 2


def test_test_send_reaches_only_that_endpoint(org, owner, endpoint, receiver):
    delivery = endpoint_test_send(endpoint=endpoint, actor=Actor(user=owner))
    webhooks_drain()
    [received] = receiver.received
    assert _verify(endpoint.secret, received)["type"] == "webhook.test"
    delivery.refresh_from_db()
    assert delivery.state == WebhookDelivery.State.DELIVERED


def test_unsubscribed_and_disabled_endpoints_are_owed_nothing(org, owner, endpoint, receiver):
    endpoint_update(endpoint=endpoint, actor=Actor(user=owner), event_types=["job.failed"])
    assert _publish(org, type="job.succeeded") is None
    endpoint_update(endpoint=endpoint, actor=Actor(user=owner), enabled=False)
    assert _publish(org, type="job.failed") is None
    webhooks_drain()
    assert receiver.received == []


def test_endpoint_failing_for_three_days_is_disabled_and_its_owners_mailed(
    org, owner, endpoint, receiver
):
    MembershipFactory(organization=org, role="developer")  # not an owner: not mailed
    receiver.statuses = [500]
    _publish(org)
    now = timezone.now()
    for _ in range(30):
        webhooks_drain(now=now)
        now += timedelta(hours=4)
    delivery = WebhookDelivery.objects.get(endpoint=endpoint)
    assert delivery.state == WebhookDelivery.State.FAILED
    endpoint.refresh_from_db()
    assert not endpoint.enabled
    assert "Disabled after failing for 3 days" in endpoint.disabled_reason
    assert org.tenants_auditevent_set.filter(action="webhook.disabled_after_failures").exists()
    # Events after that are owed to it no more; the mail goes through the outbox.
    assert _publish(org) is None
    outbox_drain()
    [message] = mail.outbox
    assert message.to == [owner.email]
    assert endpoint.url in message.body
    # Enabled again by a person, it receives events again.
    endpoint_update(endpoint=endpoint, actor=Actor(user=owner), enabled=True)
    receiver.statuses = [200]
    _publish(org)
    webhooks_drain()
    assert WebhookEndpoint.objects.get(pk=endpoint.pk).last_success_at is not None


def test_endpoint_that_succeeded_meanwhile_is_not_disabled(org, endpoint, receiver):
    receiver.statuses = [500]
    _publish(org)
    now = timezone.now()
    webhooks_drain(now=now)
    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(last_success_at=now + timedelta(days=1))
    for _ in range(30):
        now += timedelta(hours=4)
        webhooks_drain(now=now)
    assert WebhookDelivery.objects.get(endpoint=endpoint).state == WebhookDelivery.State.FAILED
    endpoint.refresh_from_db()
    assert endpoint.enabled


def test_the_log_forgets_old_events_once_nothing_is_owed(org, endpoint, receiver, settings):
    settings.WEBHOOKS_LOG_RETENTION_DAYS = 30
    delivered, owed = _publish(org), _publish(org)
    webhooks_drain()
    WebhookDelivery.objects.filter(event=owed).update(state=WebhookDelivery.State.PENDING)
    later = timezone.now() + timedelta(days=31)
    assert webhook_log_expire(now=later - timedelta(days=2)) == 0
    assert webhook_log_expire(now=later) == 1
    assert not WebhookDelivery.objects.filter(event=delivered).exists()
    assert WebhookDelivery.objects.filter(event=owed).exists()
