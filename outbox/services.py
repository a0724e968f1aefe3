"""Enqueue a side effect inside the transaction that owes it; deliver it after the commit and
again, with backoff, until its handler returns.

Delivery is at least once: a handler must be idempotent (a crash between its call and the row
being marked sent calls it again). Handlers take JSON-able keyword arguments (ids, not objects)
and are plain functions marked with `@handler(retry_on=...)`; the row stores their dotted path.
Only the errors a handler lists as passing (a network blip) are tried again; any other error is a
bug that waiting will not fix, so the message is given up at once, loudly, for an operator to
try again after the fix.
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


def handler(
    *, retry_on: tuple[type[Exception], ...]
) -> Callable[[Callable[..., object]], Callable[..., object]]:
    """Mark a function as deliverable; only marked functions are ever called from a row.

    `retry_on` names the errors that may pass (`(OSError, smtplib.SMTPException)` for mail,
    `stripe_gateway.TRANSIENT` for Stripe); there is no default, so each handler says.
    """
    if not isinstance(retry_on, tuple) or not all(
        isinstance(error, type) and issubclass(error, Exception) for error in retry_on
    ):
        raise TypeError("retry_on is a tuple of exception classes")

    def mark(func: Callable[..., object]) -> Callable[..., object]:
        setattr(func, _MARK, retry_on)
        return func

    return mark


def _handler_path(func: Callable[..., object]) -> str:
    if getattr(func, _MARK, None) is None:
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
    retry_on: tuple[type[Exception], ...] = ()
    try:
        func = import_string(message.handler)
        if getattr(func, _MARK, None) is None:
            raise TypeError(f"{message.handler} is not an outbox handler")
        retry_on = getattr(func, _MARK)
        func(**message.payload)
    except Exception as exc:
        _message_failed(message=message, error=exc, passing=isinstance(exc, retry_on), now=now)
        return False
    Message.objects.filter(pk=message.pk).update(
        state=Message.State.SENT,
        attempts=message.attempts + 1,
        sent_at=timezone.now(),
        claimed_until=None,
        last_error="",
    )
    return True


def _message_failed(*, message: Message, error: Exception, passing: bool, now: datetime) -> None:
    """Try a passing error again with backoff until the give-up age, counted from when the
    message became owed (written, or sent again by an operator); give any other up at once."""
    attempts = message.attempts + 1
    text = f"{type(error).__name__}: {error}"[:2000]
    too_old = now - message.owed_since >= timedelta(seconds=settings.OUTBOX_GIVE_UP_AFTER_S)
    given_up = too_old or not passing
    Message.objects.filter(pk=message.pk).update(
        state=Message.State.DEAD if given_up else Message.State.PENDING,
        attempts=attempts,
        next_attempt_at=now + timedelta(seconds=backoff_s(attempts)),
        claimed_until=None,
        last_error=text,
    )
    if not passing:
        logger.error(
            "outbox message %s (%s) given up at once: %s is not an error its handler retries",
            message.pk,
            message.handler,
            type(error).__name__,
            exc_info=error,
        )
    elif given_up:
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
    """An operator's nudge: try a pending or given-up message at the next drain, owed afresh
    from now (so a fixed far end or handler gets the whole give-up age again, not one try)."""
    now = timezone.now()
    Message.objects.filter(pk=message.pk).exclude(state=Message.State.SENT).update(
        state=Message.State.PENDING, owed_since=now, next_attempt_at=now, claimed_until=None
    )
