"""Reads of webhooks; each takes the organization explicitly and never writes."""

from datetime import datetime

from django.db.models import Min, QuerySet

from tenants.models import Organization

from .models import WebhookAttempt, WebhookDelivery, WebhookEndpoint


def endpoint_list(*, organization: Organization) -> QuerySet[WebhookEndpoint]:
    return WebhookEndpoint.objects.for_organization(organization).order_by("created_at", "pk")


def delivery_list(
    *, organization: Organization, endpoint: WebhookEndpoint, state: str | None = None
) -> QuerySet[WebhookDelivery]:
    deliveries = (
        WebhookDelivery.objects.for_organization(organization)
        .filter(endpoint=endpoint)
        .select_related("event")
        .order_by("-created_at", "-pk")
    )
    return deliveries.filter(state=state) if state else deliveries


def attempt_list(*, organization: Organization, delivery: WebhookDelivery) -> QuerySet:
    return WebhookAttempt.objects.for_organization(organization).filter(delivery=delivery)


def delivery_oldest_owed() -> datetime | None:
    """When the longest-owed pending delivery to an enabled endpoint became owed (Prometheus:
    the webhook outbox's lag), across organizations, on the due index."""
    return WebhookDelivery.objects.filter(
        state=WebhookDelivery.State.PENDING, endpoint__enabled=True
    ).aggregate(oldest=Min("owed_since"))["oldest"]
