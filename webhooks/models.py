"""Endpoints, their signing secrets, the events owed to them, and each delivery with its tries."""

from django.conf import settings
from django.db import models
from django.utils import timezone

from tenants.models import OrganizationOwned


class WebhookEndpoint(OrganizationOwned):
    url = models.URLField(max_length=2000)
    description = models.CharField(max_length=200, blank=True)
    # The event types it receives (webhooks.events.EVENT_TYPES); at least one.
    event_types = models.JSONField(default=list)
    enabled = models.BooleanField(default=True)
    # Why it stopped receiving events ("" while enabled): a person, or persistent failure.
    disabled_reason = models.CharField(max_length=300, blank=True)
    disabled_at = models.DateTimeField(null=True, blank=True)
    # The last 2xx answer: an endpoint that has answered none for the whole give-up age of a
    # delivery is disabled (services._delivery_given_up).
    last_success_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "pk"]
        indexes = [models.Index(fields=["organization", "enabled"], name="webhook_endpoint_org")]

    def __str__(self):
        return self.url


class WebhookSecret(OrganizationOwned):
    """A signing secret. Only a random salt is stored: the secret itself is derived from it and
    WEBHOOKS_SIGNING_KEY (services.secret_value), so a copy of the database alone cannot sign."""

    endpoint = models.ForeignKey(WebhookEndpoint, on_delete=models.CASCADE, related_name="secrets")
    salt = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now)
    # None while current; after a rotation the old secret signs too until then.
    expires_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-pk"]
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "endpoint"],
                condition=models.Q(expires_at__isnull=True),
                name="webhook_secret_one_current",
            ),
        ]

    def __str__(self):
        return f"secret of {self.endpoint} from {self.created_at:%Y-%m-%d %H:%M}"


class WebhookEvent(OrganizationOwned):
    """One thing that happened, as the payload every subscribed endpoint receives."""

    type = models.CharField(max_length=64)
    # The whole signed body: {"type", "timestamp", "data"}.
    payload = models.JSONField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-pk"]
        indexes = [models.Index(fields=["organization", "-created_at"], name="webhook_event_org")]

    def __str__(self):
        return f"{self.type} #{self.pk}"


class DeliveryState(models.TextChoices):
    PENDING = "pending", "Pending"
    DELIVERED = "delivered", "Delivered"
    FAILED = "failed", "Failed for good"


class WebhookDelivery(OrganizationOwned):
    """An event owed to one endpoint: the queue row itself (claimed with a conditional update,
    tried with backoff until a 2xx or the give-up age), and the log the tenant reads."""

    State = DeliveryState

    endpoint = models.ForeignKey(
        WebhookEndpoint, on_delete=models.CASCADE, related_name="deliveries"
    )
    event = models.ForeignKey(WebhookEvent, on_delete=models.CASCADE, related_name="deliveries")
    # The `webhook-id` header: the same on every try and resend, so receivers dedupe by it.
    message_id = models.CharField(max_length=64, unique=True, editable=False)
    state = models.CharField(max_length=10, choices=DeliveryState.choices, default="pending")
    attempts = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    # Since when it is owed: the give-up age runs from here (reset by a resend).
    owed_since = models.DateTimeField(default=timezone.now)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    # A sender holds the row until then; one that dies mid-call lets the claim lapse.
    claimed_until = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    last_status = models.PositiveIntegerField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True)

    class Meta:
        ordering = ["-created_at", "-pk"]
        indexes = [
            models.Index(
                fields=["next_attempt_at"],
                condition=models.Q(state="pending"),
                name="webhook_delivery_due",
            ),
            models.Index(
                fields=["organization", "endpoint", "-created_at"], name="webhook_delivery_log"
            ),
        ]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(state__in=DeliveryState.values),
                name="webhook_delivery_state_valid",
            ),
            models.UniqueConstraint(
                fields=["organization", "endpoint", "event"], name="webhook_delivery_once"
            ),
        ]

    def __str__(self):
        return f"{self.event.type} to {self.endpoint}: {self.state}"


class WebhookAttempt(OrganizationOwned):
    """One try of a delivery: what was sent and what came back (a bounded excerpt)."""

    delivery = models.ForeignKey(WebhookDelivery, on_delete=models.CASCADE, related_name="tries")
    number = models.PositiveIntegerField()
    started_at = models.DateTimeField(default=timezone.now)
    duration_ms = models.PositiveIntegerField(default=0)
    request_headers = models.JSONField(default=dict)
    status_code = models.PositiveIntegerField(null=True, blank=True)
    response_body = models.TextField(blank=True)
    error = models.CharField(max_length=500, blank=True)

    class Meta:
        ordering = ["-number"]
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "delivery", "number"], name="webhook_attempt_once"
            ),
        ]

    def __str__(self):
        return f"try {self.number} of {self.delivery_id}"

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300
