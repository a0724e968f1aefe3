"""Reads of webhooks; each takes the organization explicitly and never writes."""

from django.db.models import Count, Min, QuerySet

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


def delivery_pending_summary() -> dict:
    """Across organizations, the deliveries owed to enabled endpoints: `pending`, and `oldest`,
    when the longest-owed one became owed (Prometheus: the webhook outbox's lag); one query."""
    return WebhookDelivery.objects.filter(
        state=WebhookDelivery.State.PENDING, endpoint__enabled=True
    ).aggregate(pending=Count("pk"), oldest=Min("owed_since"))
