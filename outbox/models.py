"""One row per side effect owed after a commit."""

from django.db import models
from django.utils import timezone


class MessageState(models.TextChoices):
    PENDING = "pending", "Pending"
    SENT = "sent", "Sent"
    DEAD = "dead", "Given up"


class Message(models.Model):
    """A call of `handler(**payload)` owed since `owed_since`, retried with backoff until it
    returns, or given up (`dead`) on an error its handler does not retry or once it has failed
    for `OUTBOX_GIVE_UP_AFTER_S`."""

    State = MessageState

    handler = models.CharField(max_length=200)
    payload = models.JSONField(default=dict)
    # Enqueueing the same key twice owes the effect once (a webhook delivered twice, say).
    key = models.CharField(max_length=200, null=True, blank=True, unique=True)
    state = models.CharField(
        max_length=10, choices=MessageState.choices, default=MessageState.PENDING
    )
    attempts = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    # When it was written, or when an operator last asked for another try: the give-up age
    # and the operators' "owed too long" count run from here.
    owed_since = models.DateTimeField(default=timezone.now)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    # A delivery in progress holds the row until then, so two deliverers never run it at once;
    # a deliverer that dies mid-call lets the claim lapse and the row is tried again.
    claimed_until = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-pk"]
        indexes = [
            models.Index(
                fields=["next_attempt_at"],
                condition=models.Q(state="pending"),
                name="outbox_message_due",
            ),
            models.Index(
                fields=["state", "owed_since"],
                condition=~models.Q(state="sent"),
                name="outbox_message_unsent",
            ),
        ]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(state__in=MessageState.values),
                name="outbox_message_state_valid",
            ),
        ]

    def __str__(self):
        return f"{self.handler} #{self.pk}: {self.state}"
