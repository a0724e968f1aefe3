"""The webhook API and pages as a tenant uses them: the secret shown once and verifying, the
delivery log with payload and answers, resend and test-send, rotation; and as an attacker or a
lesser role tries them."""

import pytest
from django.db import transaction
from standardwebhooks import Webhook

from tenants.actors import Actor
from tenants.models import AuditEvent
from webhooks.events import EVENT_TYPES
from webhooks.models import WebhookDelivery, WebhookEndpoint
from webhooks.services import endpoint_create, event_publish, webhooks_drain

pytestmark = pytest.mark.django_db


def _url(org, rest=""):
    return f"/api/v1/orgs/{org.slug}/{rest}"


def test_created_endpoint_shows_its_secret_once_and_deliveries_verify_with_it(
    org, owner, client_for, receiver, local_receivers
):
    client = client_for(owner)
    made = client.post(
        _url(org, "webhooks/"),
        {"url": receiver.url, "event_types": ["job.failed"], "description": "ci"},
        format="json",
    )
    assert made.status_code == 201, made.content
    secret = made.json()["secret"]
    assert secret.startswith("whsec_")
    endpoint_id = made.json()["id"]
    shown = client.get(_url(org, f"webhooks/{endpoint_id}/")).json()
    assert "secret" not in shown
    assert secret not in str(client.get(_url(org, "webhooks/")).content)
    assert AuditEvent.objects.filter(organization=org, action="webhook.create").exists()

    with transaction.atomic():
        event_publish(organization=org, type="job.failed", data={"job": {"id": 3}})
    webhooks_drain()
    [received] = receiver.received
    assert Webhook(secret).verify(received.body, received.headers)["type"] == "job.failed"


def test_delivery_log_shows_payload_each_answer_and_resends(
    org, owner, client_for, receiver, local_receivers
):
    endpoint, _ = endpoint_create(
        organization=org, url=receiver.url, event_types=["job.failed"], actor=Actor(user=owner)
    )
    receiver.statuses, receiver.body = [500, 200], b"receiver says hi"
    with transaction.atomic():
        event_publish(organization=org, type="job.failed", data={"job": {"id": 3}})
    webhooks_drain()
    client = client_for(owner)
    [listed] = client.get(_url(org, f"webhooks/{endpoint.pk}/deliveries/")).json()["results"]
    assert (listed["type"], listed["state"], listed["last_status"]) == (
        "job.failed",
        "pending",
        500,
    )
    detail = client.get(_url(org, f"webhook-deliveries/{listed['id']}/")).json()
    assert detail["payload"]["data"] == {"job": {"id": 3}}
    [first_try] = detail["tries"]
    assert (first_try["status_code"], first_try["response_body"]) == (500, "receiver says hi")
    assert first_try["request_headers"]["webhook-id"] == listed["message_id"]

    page = client.get(f"/o/{org.slug}/webhooks/deliveries/{listed['id']}/")
    assert page.status_code == 200
    body = page.content.decode()
    assert "receiver says hi" in body and "&quot;job.failed&quot;" in body and "Resend" in body

    resent = client.post(_url(org, f"webhook-deliveries/{listed['id']}/resend/"))
    assert resent.status_code == 202
    webhooks_drain()
    assert [r.answered for r in receiver.received] == [500, 200]
    assert WebhookDelivery.objects.get(pk=listed["id"]).state == WebhookDelivery.State.DELIVERED


def test_test_send_and_rotation_through_the_api(org, owner, client_for, receiver, local_receivers):
    endpoint, old = endpoint_create(
        organization=org, url=receiver.url, event_types=["job.failed"], actor=Actor(user=owner)
    )
    client = client_for(owner)
    rotated = client.post(_url(org, f"webhooks/{endpoint.pk}/rotate/"), {}, format="json")
    new = rotated.json()["secret"]
    assert client.post(_url(org, f"webhooks/{endpoint.pk}/test/")).status_code == 202
    webhooks_drain()
    [received] = receiver.received
    for secret in (old, new):
        assert Webhook(secret).verify(received.body, received.headers)["type"] == "webhook.test"


def test_bad_input_is_a_clear_400_and_writes_nothing(org, owner, client_for):
    client = client_for(owner)
    for body in (
        {"url": "https://93.184.215.14/", "event_types": []},
        {"url": "https://93.184.215.14/", "event_types": ["job.exploded"]},
        {"url": "javascript:alert(1)", "event_types": ["job.failed"]},
        {"url": "http://[fd00::1]/", "event_types": ["job.failed"]},
        {"url": "x" * 3000, "event_types": ["job.failed"]},
    ):
        response = client.post(_url(org, "webhooks/"), body, format="json")
        assert response.status_code == 400, (body, response.content)
    endpoint, _ = endpoint_create(
        organization=org,
        url="https://93.184.215.14/",
        event_types=["job.failed"],
        actor=Actor(user=owner),
    )
    moved = client.patch(
        _url(org, f"webhooks/{endpoint.pk}/"), {"url": "http://169.254.169.254/"}, format="json"
    )
    assert moved.status_code == 400
    assert WebhookEndpoint.objects.get(pk=endpoint.pk).url == "https://93.184.215.14/"
    assert WebhookEndpoint.objects.filter(organization=org).count() == 1


def test_a_viewer_or_developer_cannot_see_or_create_endpoints(org, member_factory, client_for):
    for role in ("viewer", "developer", "billing"):
        client = client_for(member_factory(org, role))
        listed = client.get(_url(org, "webhooks/"))
        made = client.post(
            _url(org, "webhooks/"),
            {"url": "https://93.184.215.14/", "event_types": ["job.failed"]},
            format="json",
        )
        assert (listed.status_code, made.status_code) == (403, 403)
    assert not WebhookEndpoint.objects.exists()


def test_another_organizations_endpoint_and_deliveries_are_404(
    org, other_org, owner, member_factory, client_for
):
    theirs, _ = endpoint_create(
        organization=other_org,
        url="https://93.184.215.14/",
        event_types=list(EVENT_TYPES),
        actor=Actor(user=member_factory(other_org, "owner")),
    )
    with transaction.atomic():
        event_publish(organization=other_org, type="job.failed", data={})
    delivery = WebhookDelivery.objects.get(endpoint=theirs)
    client = client_for(owner)
    for method, path in (
        ("get", f"webhooks/{theirs.pk}/"),
        ("get", f"webhooks/{theirs.pk}/deliveries/"),
        ("post", f"webhooks/{theirs.pk}/rotate/"),
        ("post", f"webhooks/{theirs.pk}/test/"),
        ("delete", f"webhooks/{theirs.pk}/"),
        ("get", f"webhook-deliveries/{delivery.pk}/"),
        ("post", f"webhook-deliveries/{delivery.pk}/resend/"),
    ):
        assert getattr(client, method)(_url(org, path)).status_code == 404, path
    assert client.get(f"/o/{org.slug}/webhooks/deliveries/{delivery.pk}/").status_code == 404
    assert WebhookEndpoint.objects.filter(pk=theirs.pk).exists()


def test_the_endpoints_page_creates_one_and_shows_the_secret_once(org, owner, client_for):
    client = client_for(owner)
    page = client.post(
        f"/o/{org.slug}/webhooks/",
        {"url": "https://93.184.215.14/in", "event_types": ["job.failed", "invoice.paid"]},
    )
    assert page.status_code == 201
    assert "whsec_" in page.content.decode()
    endpoint = WebhookEndpoint.objects.get(organization=org)
    assert endpoint.event_types == ["invoice.paid", "job.failed"]
    again = client.get(f"/o/{org.slug}/webhooks/{endpoint.pk}/").content.decode()
    assert "whsec_" not in again
    refused = client.post(
        f"/o/{org.slug}/webhooks/", {"url": "http://localhost/", "event_types": ["job.failed"]}
    )
    assert refused.status_code == 400 and "loopback" in refused.content.decode()
