"""Reads of the outbox, for operators."""

from datetime import timedelta

from django.db.models import Count, Min, Q, QuerySet
from django.utils import timezone

from .models import Message


def message_stuck(*, older_than_s: float = 300) -> QuerySet[Message]:
    """Messages given up, or still owed longer than `older_than_s` (since they were written or
    last sent again by an operator)."""
    cutoff = timezone.now() - timedelta(seconds=older_than_s)
    return Message.objects.filter(
        Q(state=Message.State.DEAD) | Q(state=Message.State.PENDING, owed_since__lt=cutoff)
    )


def message_stuck_counts(*, older_than_s: float = 300) -> dict[str, int]:
    """How many messages `message_stuck` holds: `given_up` and `owed` (pending), in one query."""
    return message_stuck(older_than_s=older_than_s).aggregate(
        given_up=Count("pk", filter=Q(state=Message.State.DEAD)),
        owed=Count("pk", filter=Q(state=Message.State.PENDING)),
    )


def message_unsent_by_handler() -> list[dict]:
    """Per handler and state (pending, given up): `handler`, `state`, `messages`, and `oldest`,
    the earliest `owed_since`; one grouped query on the unsent rows' index (Prometheus)."""
    return list(
        Message.objects.filter(state__in=[Message.State.PENDING, Message.State.DEAD])
        .values("handler", "state")
        .annotate(messages=Count("pk"), oldest=Min("owed_since"))
        .order_by()
    )
