"""With the broker down an event is still owed: the change commits, the kick after the commit
fails and is only logged, and once the broker is back beat's periodic drain, run by a real
worker, delivers it, signed, once."""

import pytest
from django.db import transaction
from standardwebhooks import Webhook

from tenants.actors import Actor
from tests.pool import Pool
from tests.processes import wait_for
from webhooks.events import EVENT_TYPES
from webhooks.models import WebhookDelivery
from webhooks.services import endpoint_create, event_publish


@pytest.mark.django_db(transaction=True)
def test_an_event_owed_during_a_broker_outage_is_delivered_by_the_periodic_drain(
    org, owner, receiver, local_receivers, broker_down, tmp_path
):
    endpoint, secret = endpoint_create(
        organization=org, url=receiver.url, event_types=list(EVENT_TYPES), actor=Actor(user=owner)
    )
    with transaction.atomic():
        event_publish(organization=org, type="job.succeeded", data={"job": {"id": 42}})
    delivery = WebhookDelivery.objects.get(endpoint=endpoint)
    assert delivery.state == WebhookDelivery.State.PENDING and delivery.attempts == 0

    broker_down.start()
    pool = Pool(tmp_path)
    pool.env["WEBHOOKS_DRAIN_EVERY_S"] = "0.5"
    pool.env["WEBHOOKS_ALLOW_PRIVATE_ADDRESSES"] = "true"
    try:
        pool.start_control_plane()
        wait_for(
            lambda: WebhookDelivery.objects.filter(
                pk=delivery.pk, state=WebhookDelivery.State.DELIVERED
            ).exists(),
            timeout=60,
            what="beat's drain to deliver the webhook",
        )
    except AssertionError:
        print(pool.logs())
        raise
    finally:
        pool.stop()

    [received] = receiver.received
    assert Webhook(secret).verify(received.body, received.headers)["data"] == {"job": {"id": 42}}
    assert received.headers["webhook-id"] == delivery.message_id
