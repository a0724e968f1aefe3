"""Writes for webhooks: endpoints and their secrets, events owed in the caller's transaction, and
delivering them signed, with backoff, at least once.

The deliveries are their own queue rather than outbox messages: each endpoint's give-up age,
backoff schedule and log are the tenant's business, shown on its pages, and a resend keeps the
`webhook-id` a receiver dedupes by. They are kicked after the commit by a best-effort Celery
send and drained by beat, so a broker outage delays them and loses none.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import smtplib
import time
from datetime import datetime, timedelta

from celery import current_app
from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone
from standardwebhooks import Webhook

from outbox.services import handler as outbox_handler
from outbox.services import message_enqueue
from tenants.actors import Actor
from tenants.errors import ConflictError, DomainError
from tenants.models import Membership, Organization
from tenants.scopes import Role
from tenants.services import audit_record

from .events import EVENT_TYPES, TEST_EVENT
from .models import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookEvent, WebhookSecret
from .sending import Answer, Target, UnsafeAddress, post, target_resolve

logger = logging.getLogger(__name__)

SYSTEM = Actor()

# Seconds to wait after the n-th failed try (the last repeats) until the give-up age: about
# twenty tries over three days, the first ones close together for a receiver that blinked.
RETRY_SCHEDULE_S = (5, 300, 1800, 7200, 18000, 36000)
MAX_ENDPOINTS = 20


class WebhookError(DomainError):
    code = "webhook_invalid"


# Secrets


def secret_value(secret: WebhookSecret) -> str:
    """The `whsec_...` secret: derived from the stored salt and WEBHOOKS_SIGNING_KEY, never
    stored itself (changing that key, or SECRET_KEY in its place, changes every endpoint's
    secret)."""
    key = (settings.WEBHOOKS_SIGNING_KEY or settings.SECRET_KEY).encode()
    raw = hmac.new(key, f"webhook-secret:{secret.salt}".encode(), hashlib.sha256).digest()
    return "whsec_" + base64.b64encode(raw).decode()


def _secret_new(endpoint: WebhookEndpoint) -> WebhookSecret:
    return WebhookSecret.objects.create(
        organization_id=endpoint.organization_id, endpoint=endpoint, salt=secrets.token_hex(32)
    )


def signing_secrets(*, endpoint: WebhookEndpoint, now: datetime | None = None) -> list[str]:
    """The secrets that sign a delivery now: the current one, then any still in its overlap."""
    now = now or timezone.now()
    rows = WebhookSecret.objects.for_organization(endpoint.organization).filter(
        Q(expires_at__isnull=True) | Q(expires_at__gt=now), endpoint=endpoint
    )
    return [secret_value(s) for s in sorted(rows, key=lambda s: s.expires_at is not None)]


# Endpoints


def _check_url(url: str) -> str:
    url = (url or "").strip()
    if not url or len(url) > 2000:
        raise WebhookError("Give the URL to send to.", fields={"url": ["Required, 2000 at most."]})
    try:
        target_resolve(url)
    except UnsafeAddress as refused:
        raise WebhookError(str(refused), fields={"url": [str(refused)]}) from refused
    return url


def _check_event_types(event_types) -> list[str]:
    if not isinstance(event_types, list | tuple) or not event_types:
        raise WebhookError(
            "Choose at least one event type.", fields={"event_types": ["Choose at least one."]}
        )
    unknown = sorted({str(t) for t in event_types} - set(EVENT_TYPES))
    if unknown:
        raise WebhookError(
            f"Unknown event types: {', '.join(unknown)}.",
            fields={"event_types": [f"Choose among {', '.join(EVENT_TYPES)}."]},
        )
    return sorted(set(event_types))


def endpoint_create(
    *,
    organization: Organization,
    url: str,
    event_types: list[str],
    actor: Actor,
    description: str = "",
) -> tuple[WebhookEndpoint, str]:
    """A new endpoint and its secret, returned once here (it is shown again only on request)."""
    # Checked before the transaction opens: resolving the name is a network call.
    url, event_types = _check_url(url), _check_event_types(event_types)
    with transaction.atomic():
        Organization.objects.select_for_update().get(pk=organization.pk)
        if WebhookEndpoint.objects.for_organization(organization).count() >= MAX_ENDPOINTS:
            raise ConflictError(f"An organization has at most {MAX_ENDPOINTS} webhook endpoints.")
        endpoint = WebhookEndpoint.objects.create(
            organization=organization,
            url=url,
            description=description[:200],
            event_types=event_types,
            created_by=actor.user,
        )
        secret = _secret_new(endpoint)
        audit_record(
            organization=organization,
            actor=actor,
            action="webhook.create",
            target=endpoint,
            data={"url": url, "event_types": event_types},
        )
    return endpoint, secret_value(secret)


def endpoint_update(
    *,
    endpoint: WebhookEndpoint,
    actor: Actor,
    url: str | None = None,
    event_types: list[str] | None = None,
    description: str | None = None,
    enabled: bool | None = None,
) -> WebhookEndpoint:
    """Change an endpoint; enabling one clears why it was disabled."""
    # A new URL is checked before the transaction opens: resolving the name is a network call.
    url = _check_url(url) if url is not None and url != endpoint.url else None
    return _endpoint_change(
        endpoint=endpoint,
        actor=actor,
        url=url,
        event_types=event_types,
        description=description,
        enabled=enabled,
    )


@transaction.atomic
def _endpoint_change(
    *,
    endpoint: WebhookEndpoint,
    actor: Actor,
    url: str | None,
    event_types: list[str] | None,
    description: str | None,
    enabled: bool | None,
) -> WebhookEndpoint:
    endpoint = WebhookEndpoint.objects.select_for_update().get(pk=endpoint.pk)
    changed = {}
    if url is not None and url != endpoint.url:
        endpoint.url = changed["url"] = url
    if event_types is not None:
        event_types = _check_event_types(event_types)
        if event_types != endpoint.event_types:
            endpoint.event_types = changed["event_types"] = event_types
    if description is not None and description != endpoint.description:
        endpoint.description = changed["description"] = description[:200]
    if enabled is not None and enabled != endpoint.enabled:
        endpoint.enabled = changed["enabled"] = enabled
        endpoint.disabled_at = None if enabled else timezone.now()
        endpoint.disabled_reason = "" if enabled else f"Disabled by {actor.label}."
    if changed:
        endpoint.save()
        action = {True: "webhook.enable", False: "webhook.disable"}.get(
            changed.get("enabled"), "webhook.update"
        )
        audit_record(
            organization=endpoint.organization,
            actor=actor,
            action=action,
            target=endpoint,
            data=changed,
        )
    return endpoint


@transaction.atomic
def endpoint_delete(*, endpoint: WebhookEndpoint, actor: Actor) -> None:
    audit_record(
        organization=endpoint.organization,
        actor=actor,
        action="webhook.delete",
        target=endpoint,
        data={"url": endpoint.url},
    )
    endpoint.delete()


@transaction.atomic
def endpoint_secret_rotate(
    *, endpoint: WebhookEndpoint, actor: Actor, overlap_s: int | None = None
) -> str:
    """A new current secret, returned once; the old one keeps signing too for `overlap_s`
    (WEBHOOKS_ROTATION_OVERLAP_S by default), so receivers can switch without a gap."""
    endpoint = WebhookEndpoint.objects.select_for_update().get(pk=endpoint.pk)
    overlap_s = settings.WEBHOOKS_ROTATION_OVERLAP_S if overlap_s is None else overlap_s
    if not 0 <= overlap_s <= 7 * 24 * 3600:
        raise WebhookError(
            "The overlap is between 0 and 7 days.", fields={"overlap_s": ["0 to 604800."]}
        )
    now = timezone.now()
    WebhookSecret.objects.for_organization(endpoint.organization).filter(
        endpoint=endpoint, expires_at__isnull=True
    ).update(expires_at=now + timedelta(seconds=overlap_s))
    # Secrets whose overlap is over sign nothing more.
    WebhookSecret.objects.for_organization(endpoint.organization).filter(
        endpoint=endpoint, expires_at__lte=now
    ).delete()
    secret = _secret_new(endpoint)
    audit_record(
        organization=endpoint.organization,
        actor=actor,
        action="webhook.rotate",
        target=endpoint,
        data={"overlap_s": overlap_s},
    )
    return secret_value(secret)


# Events


def _payload(*, type: str, data: dict, now: datetime) -> dict:
    return {"type": type, "timestamp": now.isoformat().replace("+00:00", "Z"), "data": data}


def event_publish(*, organization: Organization, type: str, data: dict) -> WebhookEvent | None:
    """Owe the event to every enabled endpoint of the organization subscribed to `type`.

    Must run inside the transaction that makes the change, so the event is owed exactly when
    the change commits; with no endpoint subscribed nothing is written.
    """
    if type not in EVENT_TYPES:
        raise ValueError(f"unknown webhook event type {type!r}")
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("event_publish must run inside the transaction that makes the change")
    # Matched here, not by a JSON lookup SQLite lacks (the embedded default): an organization
    # has at most MAX_ENDPOINTS endpoints.
    endpoints = [
        pk
        for pk, types in WebhookEndpoint.objects.for_organization(organization)
        .filter(enabled=True)
        .values_list("pk", "event_types")
        if type in types
    ]
    if not endpoints:
        return None
    now = timezone.now()
    event = WebhookEvent.objects.create(
        organization=organization, type=type, payload=_payload(type=type, data=data, now=now)
    )
    deliveries = WebhookDelivery.objects.bulk_create(
        WebhookDelivery(
            organization=organization,
            endpoint_id=endpoint_id,
            event=event,
            message_id=f"msg_{secrets.token_hex(16)}",
            owed_since=now,
            next_attempt_at=now,
        )
        for endpoint_id in endpoints
    )
    ids = [delivery.pk for delivery in deliveries]
    transaction.on_commit(lambda: _deliver_soon(ids))
    return event


def _deliver_soon(delivery_ids: list[int]) -> None:
    # Best effort: with the broker down the rows stay due and the periodic drain sends them.
    for delivery_id in delivery_ids:
        try:
            current_app.send_task("webhooks.deliver", args=[delivery_id], retry=False)
        except Exception:
            logger.warning("webhook delivery %s waits for the next drain", delivery_id)
            return


@transaction.atomic
def endpoint_test_send(*, endpoint: WebhookEndpoint, actor: Actor) -> WebhookDelivery:
    """Owe a `webhook.test` event to this endpoint alone (sent even while it is disabled, to
    check it before enabling it again)."""
    now = timezone.now()
    event = WebhookEvent.objects.create(
        organization=endpoint.organization,
        type=TEST_EVENT,
        payload=_payload(
            type=TEST_EVENT,
            data={"endpoint": {"id": endpoint.pk, "url": endpoint.url}, "sent_by": actor.label},
            now=now,
        ),
    )
    delivery = WebhookDelivery.objects.create(
        organization=endpoint.organization,
        endpoint=endpoint,
        event=event,
        message_id=f"msg_{secrets.token_hex(16)}",
        owed_since=now,
        next_attempt_at=now,
    )
    audit_record(
        organization=endpoint.organization, actor=actor, action="webhook.test", target=endpoint
    )
    transaction.on_commit(lambda: _deliver_soon([delivery.pk]))
    return delivery


@transaction.atomic
def delivery_resend(*, delivery: WebhookDelivery, actor: Actor) -> WebhookDelivery:
    """Send a delivery again, with the same `webhook-id` (a receiver that already has it may
    ignore it), owed afresh from now for the whole give-up age."""
    delivery = WebhookDelivery.objects.select_for_update().get(pk=delivery.pk)
    if delivery.state == WebhookDelivery.State.PENDING and delivery.attempts == 0:
        raise ConflictError("This delivery has not been tried yet; it is on its way.")
    now = timezone.now()
    delivery.state = WebhookDelivery.State.PENDING
    delivery.owed_since = delivery.next_attempt_at = now
    delivery.claimed_until = None
    delivery.save(update_fields=["state", "owed_since", "next_attempt_at", "claimed_until"])
    audit_record(
        organization=delivery.organization,
        actor=actor,
        action="webhook.resend",
        target=delivery.endpoint,
        data={"delivery": delivery.pk, "message_id": delivery.message_id},
    )
    transaction.on_commit(lambda: _deliver_soon([delivery.pk]))
    return delivery


# Delivering


def _body(payload: dict) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def signed_headers(*, endpoint: WebhookEndpoint, message_id: str, body: bytes, now: datetime):
    """The Standard Webhooks headers: id, timestamp of this try, and one signature per secret
    in force (space-separated), so a receiver holding either side of a rotation verifies."""
    signatures = [
        Webhook(secret).sign(msg_id=message_id, timestamp=now, data=body)
        for secret in signing_secrets(endpoint=endpoint, now=now)
    ]
    return {
        "content-type": "application/json",
        "user-agent": "factory_saas-webhooks/1",
        "webhook-id": message_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": " ".join(signatures),
    }


def _due(now: datetime):
    return (
        WebhookDelivery.objects.filter(
            state=WebhookDelivery.State.PENDING, next_attempt_at__lte=now
        )
        .filter(Q(claimed_until__isnull=True) | Q(claimed_until__lt=now))
        # A disabled endpoint's deliveries wait for it to be enabled again; tests go anyway.
        .filter(Q(endpoint__enabled=True) | Q(event__type=TEST_EVENT))
    )


def delivery_attempt(*, delivery_id: int, now: datetime | None = None) -> bool:
    """Try one due delivery, outside any transaction; True if the receiver answered 2xx now.

    Claimed with one conditional update, so a delivery another sender holds, or one already
    delivered, is left alone: a receiver that answered 2xx is never sent it again.
    """
    now = now or timezone.now()
    claimed = (
        _due(now)
        .filter(pk=delivery_id)
        .update(claimed_until=now + timedelta(seconds=settings.WEBHOOKS_CLAIM_S))
    )
    if not claimed:
        return False
    delivery = WebhookDelivery.objects.select_related("endpoint", "event").get(pk=delivery_id)
    endpoint = delivery.endpoint
    body = _body(delivery.event.payload)
    # Signed at the moment of the try: the receiver checks the timestamp is recent.
    headers = signed_headers(
        endpoint=endpoint, message_id=delivery.message_id, body=body, now=timezone.now()
    )
    try:
        target: Target = target_resolve(endpoint.url)
    except UnsafeAddress as refused:
        answer = Answer(status_code=None, body="", error=str(refused)[:500], duration_ms=0)
    else:
        answer = post(target=target, body=body, headers=headers)
    ok = answer.ok
    _attempt_record(
        delivery=delivery,
        now=now,
        headers=headers,
        status_code=answer.status_code,
        body=answer.body,
        error=answer.error or ("" if ok else f"Answered {answer.status_code}."),
        duration_ms=answer.duration_ms,
        ok=ok,
    )
    return ok


@transaction.atomic
def _attempt_record(*, delivery, now, headers, status_code, body, error, duration_ms, ok) -> None:
    attempts = delivery.attempts + 1
    WebhookAttempt.objects.create(
        organization_id=delivery.organization_id,
        delivery=delivery,
        number=attempts,
        started_at=now,
        duration_ms=duration_ms,
        # The signatures are no secret (each is bound to this body and time), but useless to
        # keep: the log shows which headers were sent.
        request_headers={k: v for k, v in headers.items() if k != "webhook-signature"},
        status_code=status_code,
        response_body=body,
        error=error[:500],
    )
    fields = {"attempts": attempts, "claimed_until": None, "last_status": status_code}
    if ok:
        WebhookDelivery.objects.filter(pk=delivery.pk).update(
            state=WebhookDelivery.State.DELIVERED,
            delivered_at=timezone.now(),
            last_error="",
            **fields,
        )
        WebhookEndpoint.objects.filter(pk=delivery.endpoint_id).update(last_success_at=now)
        return
    wait = RETRY_SCHEDULE_S[min(attempts, len(RETRY_SCHEDULE_S)) - 1]
    give_up = now - delivery.owed_since >= timedelta(seconds=settings.WEBHOOKS_GIVE_UP_AFTER_S)
    WebhookDelivery.objects.filter(pk=delivery.pk).update(
        state=WebhookDelivery.State.FAILED if give_up else WebhookDelivery.State.PENDING,
        next_attempt_at=now + timedelta(seconds=wait),
        last_error=error[:500],
        **fields,
    )
    if give_up and delivery.event.type != TEST_EVENT:
        _delivery_given_up(delivery=delivery, now=now)


def _delivery_given_up(*, delivery: WebhookDelivery, now: datetime) -> None:
    """An endpoint that answered no 2xx for the whole give-up age of a delivery is failing
    persistently: disable it (its other deliveries wait) and mail the organization's owners."""
    endpoint = WebhookEndpoint.objects.select_for_update().get(pk=delivery.endpoint_id)
    if not endpoint.enabled:
        return
    if endpoint.last_success_at is not None and endpoint.last_success_at >= delivery.owed_since:
        return
    days = settings.WEBHOOKS_GIVE_UP_AFTER_S / 86400
    endpoint.enabled = False
    endpoint.disabled_at = now
    endpoint.disabled_reason = (
        f"Disabled after failing for {days:g} days: no delivery succeeded since "
        f"{delivery.owed_since:%Y-%m-%d %H:%M} UTC (last error: {delivery.last_error or '?'})."
    )[:300]
    endpoint.save(update_fields=["enabled", "disabled_at", "disabled_reason"])
    audit_record(
        organization=endpoint.organization,
        actor=SYSTEM,
        action="webhook.disabled_after_failures",
        target=endpoint,
        data={"delivery": delivery.pk, "since": delivery.owed_since.isoformat()},
    )
    message_enqueue(
        handler=endpoint_disabled_mail,
        payload={"endpoint_id": endpoint.pk},
        key=f"webhook-disabled:{endpoint.pk}:{now.isoformat()}",
    )


@outbox_handler(retry_on=(OSError, smtplib.SMTPException))
def endpoint_disabled_mail(*, endpoint_id: int) -> None:
    """Tell the organization's owners their endpoint was disabled (an SMTP failure raises, so the
    outbox sends it again later)."""
    endpoint = WebhookEndpoint.objects.select_related("organization").filter(pk=endpoint_id).first()
    if endpoint is None or endpoint.enabled:
        return
    organization = endpoint.organization
    owners = list(
        Membership.objects.for_organization(organization)
        .filter(role=Role.OWNER)
        .values_list("user__email", flat=True)
    )
    if not owners:
        return
    link = settings.SITE_URL.rstrip("/") + reverse(
        "webhooks:endpoint", args=[organization.slug, endpoint.pk]
    )
    send_mail(
        f"{organization.name}: webhook endpoint disabled",
        f"The webhook endpoint {endpoint.url} of {organization.name} has been disabled.\n\n"
        f"{endpoint.disabled_reason}\n\nEvents are no longer sent to it. Fix the receiver, "
        f"send a test event, and enable it again at {link}",
        None,
        owners,
    )


def webhooks_drain(*, now: datetime | None = None, limit: int = 100) -> int:
    """Try the due deliveries, oldest first, within WEBHOOKS_DRAIN_BUDGET_S; returns how many
    were delivered. Run by beat, it is what sends what a broker outage held back."""
    now = now or timezone.now()
    deadline = time.monotonic() + settings.WEBHOOKS_DRAIN_BUDGET_S
    due = list(_due(now).order_by("next_attempt_at", "pk").values_list("pk", flat=True)[:limit])
    delivered = 0
    for delivery_id in due:
        delivered += delivery_attempt(delivery_id=delivery_id, now=now)
        if time.monotonic() >= deadline:
            break
    return delivered


def webhook_log_expire(*, now: datetime | None = None, batch: int = 1000) -> int:
    """Delete events older than WEBHOOKS_LOG_RETENTION_DAYS with their deliveries and tries,
    once none of their deliveries is still owed; returns how many events went."""
    now = now or timezone.now()
    cutoff = now - timedelta(days=settings.WEBHOOKS_LOG_RETENTION_DAYS)
    deleted = 0
    while True:
        ids = list(
            WebhookEvent.objects.filter(created_at__lt=cutoff)
            .exclude(deliveries__state=WebhookDelivery.State.PENDING)
            .values_list("pk", flat=True)[:batch]
        )
        if not ids:
            return deleted
        WebhookEvent.objects.filter(pk__in=ids).delete()
        deleted += len(ids)
