"""Reads of the outbox, for operators."""

from datetime import timedelta

from django.db.models import QuerySet
from django.utils import timezone

from .models import Message


def message_stuck(*, older_than_s: float = 300) -> QuerySet[Message]:
    """Messages given up, or still owed longer than `older_than_s` after they were written."""
    cutoff = timezone.now() - timedelta(seconds=older_than_s)
    return Message.objects.filter(state=Message.State.DEAD) | Message.objects.filter(
        state=Message.State.PENDING, created_at__lt=cutoff
    )
