"""Enqueue a side effect inside the transaction that owes it; deliver it after the commit and
again, with backoff, until its handler returns.

Delivery is at least once: a handler must be idempotent (a crash between its call and the row
being marked sent calls it again). Handlers take JSON-able keyword arguments (ids, not objects)
and are plain functions marked with `@handler`; the row stores their dotted path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from celery import current_app
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.module_loading import import_string

from .models import Message

logger = logging.getLogger(__name__)

_MARK = "outbox_handler"


def handler(func: Callable[..., object]) -> Callable[..., object]:
    """Mark `func` as deliverable; only marked functions are ever called from a row."""
    setattr(func, _MARK, True)
    return func


def _handler_path(func: Callable[..., object]) -> str:
    if not getattr(func, _MARK, False):
        raise TypeError(f"{func.__qualname__} is not marked with @outbox.services.handler")
    path = f"{func.__module__}.{func.__qualname__}"
    if import_string(path) is not func:
        raise TypeError(f"{path} is not importable by that name; handlers live at module level")
    return path


def message_enqueue(
    *, handler: Callable[..., object], payload: dict, key: str | None = None
) -> Message | None:
    """Owe `handler(**payload)` once the surrounding transaction commits.

    Must run inside that transaction, so the effect is owed exactly when the change is made.
    With `key`, a second enqueue of the same key owes nothing more (returns None).
    """
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("message_enqueue must run inside the transaction that owes the effect")
    path = _handler_path(handler)
    if key is None:
        message = Message.objects.create(handler=path, payload=payload)
    else:
        try:
            with transaction.atomic():  # a savepoint, so a repeated key leaves the caller's
                message = Message.objects.create(handler=path, payload=payload, key=key)
        except IntegrityError:
            if Message.objects.filter(key=key).exists():
                return None
            raise
    transaction.on_commit(lambda: _deliver_soon(message.pk))
    return message


def _deliver_soon(message_id: int) -> None:
    # Best effort: with the broker down the row stays due and the periodic drain sends it.
    try:
        current_app.send_task("outbox.deliver", args=[message_id], retry=False)
    except Exception:
        logger.warning("outbox message %s waits for the next drain", message_id, exc_info=True)


def backoff_s(attempts: int) -> float:
    """Seconds before the next try after `attempts` failures: doubling, capped."""
    return min(settings.OUTBOX_BACKOFF_MAX_S, settings.OUTBOX_BACKOFF_BASE_S * 2 ** (attempts - 1))


def message_deliver(*, message_id: int, now: datetime | None = None) -> bool:
    """Call one due message's handler, outside any transaction; True if it was delivered now.

    Claimed with one conditional update, so a message another deliverer holds, or one already
    sent, is left alone.
    """
    now = now or timezone.now()
    claimed = (
        Message.objects.filter(pk=message_id, state=Message.State.PENDING, next_attempt_at__lte=now)
        .filter(Q(claimed_until__isnull=True) | Q(claimed_until__lt=now))
        .update(claimed_until=now + timedelta(seconds=settings.OUTBOX_CLAIM_S))
    )
    if not claimed:
        return False
    message = Message.objects.get(pk=message_id)
    try:
        func = import_string(message.handler)
        if not getattr(func, _MARK, False):
            raise TypeError(f"{message.handler} is not an outbox handler")
        func(**message.payload)
    except Exception as exc:
        _message_failed(message=message, error=exc, now=now)
        return False
    Message.objects.filter(pk=message.pk).update(
        state=Message.State.SENT,
        attempts=message.attempts + 1,
        sent_at=timezone.now(),
        claimed_until=None,
        last_error="",
    )
    return True


def _message_failed(*, message: Message, error: Exception, now: datetime) -> None:
    attempts = message.attempts + 1
    text = f"{type(error).__name__}: {error}"[:2000]
    given_up = now - message.created_at >= timedelta(seconds=settings.OUTBOX_GIVE_UP_AFTER_S)
    Message.objects.filter(pk=message.pk).update(
        state=Message.State.DEAD if given_up else Message.State.PENDING,
        attempts=attempts,
        next_attempt_at=now + timedelta(seconds=backoff_s(attempts)),
        claimed_until=None,
        last_error=text,
    )
    if given_up:
        logger.error("outbox message %s (%s) given up: %s", message.pk, message.handler, text)
    else:
        logger.warning("outbox message %s (%s) failed: %s", message.pk, message.handler, text)


def outbox_drain(*, now: datetime | None = None, limit: int = 100) -> int:
    """Deliver the due messages, oldest first, within `OUTBOX_DRAIN_BUDGET_S`; returns how many
    were delivered. Run periodically, it is what delivers what a broker outage held back."""
    now = now or timezone.now()
    deadline = time.monotonic() + settings.OUTBOX_DRAIN_BUDGET_S
    due = (
        Message.objects.filter(state=Message.State.PENDING, next_attempt_at__lte=now)
        .filter(Q(claimed_until__isnull=True) | Q(claimed_until__lt=now))
        .order_by("next_attempt_at", "pk")
        .values_list("pk", flat=True)[:limit]
    )
    delivered = 0
    for message_id in list(due):
        delivered += message_deliver(message_id=message_id, now=now)
        if time.monotonic() >= deadline:
            break
    return delivered


def message_retry_now(*, message: Message) -> None:
    """An operator's nudge: try a pending or given-up message at the next drain."""
    Message.objects.filter(pk=message.pk).exclude(state=Message.State.SENT).update(
        state=Message.State.PENDING, next_attempt_at=timezone.now(), claimed_until=None
    )
