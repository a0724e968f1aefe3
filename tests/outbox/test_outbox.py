"""The outbox: an effect is owed exactly when its transaction commits, delivered at least once,
retried with backoff while the far end is down, and never lost to a broker outage."""

import logging
from datetime import timedelta
from pathlib import Path

import pytest
from django.core import mail
from django.db import transaction
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone

from outbox.models import Message
from outbox.services import backoff_s, message_deliver, message_enqueue, outbox_drain
from tenants import services as tenant_services
from tenants.actors import Actor
from tenants.models import Organization
from tests.chaos.redis_server import RedisServer, celery_broker
from tests.outbox import handlers
from tests.pool import Pool
from tests.processes import wait_for


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def effects(tmp_path):
    return tmp_path / "effects.txt"


@pytest.mark.django_db(transaction=True)
def test_an_effect_is_owed_only_if_its_transaction_commits(effects):
    with pytest.raises(ZeroDivisionError), transaction.atomic():
        message_enqueue(handler=handlers.append_line, payload={"path": str(effects), "line": "a"})
        1 / 0  # noqa: B018  the change that owed the effect fails
    assert not Message.objects.exists()

    with transaction.atomic():
        message_enqueue(handler=handlers.append_line, payload={"path": str(effects), "line": "b"})
    assert Message.objects.get().state == Message.State.PENDING
    assert outbox_drain() == 1
    assert lines(effects) == ["b"]
    assert Message.objects.get().state == Message.State.SENT
    assert outbox_drain() == 0  # sent is sent: nothing runs twice
    assert lines(effects) == ["b"]


@pytest.mark.django_db(transaction=True)
def test_enqueueing_outside_a_transaction_is_refused(effects):
    with pytest.raises(RuntimeError, match="inside the transaction"):
        message_enqueue(handler=handlers.append_line, payload={"path": str(effects), "line": "x"})
    assert not Message.objects.exists()


@pytest.mark.django_db
def test_only_functions_marked_as_handlers_are_ever_called(effects):
    with pytest.raises(TypeError, match="not marked"):
        message_enqueue(handler=handlers.not_a_handler, payload={"path": str(effects)})
    # A row naming any other function (written by hand, or by a bug) is refused at delivery.
    message = Message.objects.create(
        handler="tests.outbox.handlers.not_a_handler", payload={"path": str(effects)}
    )
    assert message_deliver(message_id=message.pk) is False
    message.refresh_from_db()
    assert lines(effects) == []
    assert "not an outbox handler" in message.last_error
    # A bug, not an outage: given up at once for an operator to see.
    assert message.state == Message.State.DEAD and message.attempts == 1


@pytest.mark.django_db
def test_a_key_owes_its_effect_once(effects):
    payload = {"path": str(effects), "line": "once"}
    first = message_enqueue(handler=handlers.append_line, payload=payload, key="event:1")
    second = message_enqueue(handler=handlers.append_line, payload=payload, key="event:1")
    assert first is not None and second is None
    assert Message.objects.count() == 1


@pytest.mark.django_db
def test_a_failing_far_end_is_retried_with_doubling_backoff_until_it_answers(
    effects, tmp_path, settings
):
    settings.OUTBOX_BACKOFF_BASE_S = 10
    settings.OUTBOX_BACKOFF_MAX_S = 35
    blocker = tmp_path / "down"
    blocker.touch()
    message = message_enqueue(
        handler=handlers.fail_while_file_exists,
        payload={"path": str(effects), "blocker": str(blocker)},
    )
    now = timezone.now()
    waits = []
    for attempt in range(1, 5):
        assert outbox_drain(now=now) == 0
        message.refresh_from_db()
        assert message.attempts == attempt
        assert "ConnectionRefusedError: far end down" in message.last_error
        waits.append((message.next_attempt_at - now).total_seconds())
        # Not due before its time.
        assert outbox_drain(now=message.next_attempt_at - timedelta(seconds=1)) == 0
        now = message.next_attempt_at
    assert waits == [10, 20, 35, 35]
    assert lines(effects) == []

    blocker.unlink()
    assert outbox_drain(now=now) == 1
    message.refresh_from_db()
    assert (message.state, message.attempts, message.last_error) == ("sent", 5, "")
    assert lines(effects) == ["delivered"]


@pytest.mark.django_db
def test_a_message_failing_past_the_give_up_age_is_given_up_loudly(
    effects, tmp_path, settings, caplog
):
    settings.OUTBOX_GIVE_UP_AFTER_S = 3600
    blocker = tmp_path / "down"
    blocker.touch()
    message = message_enqueue(
        handler=handlers.fail_while_file_exists,
        payload={"path": str(effects), "blocker": str(blocker)},
    )
    outbox_drain(now=timezone.now() + timedelta(minutes=59))
    message.refresh_from_db()
    assert message.state == Message.State.PENDING
    with caplog.at_level(logging.ERROR, logger="outbox.services"):
        outbox_drain(now=timezone.now() + timedelta(hours=2))
    message.refresh_from_db()
    assert message.state == Message.State.DEAD
    assert f"outbox message {message.pk}" in caplog.text and "given up" in caplog.text
    assert outbox_drain(now=timezone.now() + timedelta(days=10)) == 0


@pytest.mark.django_db
@pytest.mark.parametrize(
    "handler, payload, error",
    [
        (handlers.fail_with_a_bug, {}, "KeyError: 'invoice_id'"),
        # A payload the handler does not take (a renamed argument, say).
        (handlers.append_line, {"line": "x", "colour": "red"}, "TypeError: append_line()"),
    ],
)
def test_a_handler_raising_an_error_it_does_not_list_as_passing_is_given_up_at_once_and_logged(
    effects, caplog, handler, payload, error
):
    message = message_enqueue(handler=handler, payload={"path": str(effects), **payload})
    with caplog.at_level(logging.WARNING, logger="outbox.services"):
        assert outbox_drain() == 0
    message.refresh_from_db()
    assert (message.state, message.attempts) == (Message.State.DEAD, 1)
    assert message.last_error.startswith(error)
    [record] = caplog.records
    assert record.levelno == logging.ERROR and f"outbox message {message.pk}" in record.message
    assert record.exc_info is not None  # the traceback, for whoever fixes the bug
    # Never tried again on its own, however long one waits.
    assert outbox_drain(now=timezone.now() + timedelta(days=10)) == 0
    message.refresh_from_db()
    assert message.attempts == 1 and lines(effects) == []


@pytest.mark.django_db
def test_an_invitation_mail_that_cannot_be_built_is_given_up_at_once(org, owner, caplog):
    """A real handler's bug: a line break in the organization's name makes the subject an
    invalid header; no retry can send it."""
    Organization.objects.filter(pk=org.pk).update(name="Acme\nBcc: everyone@example.com")
    org.refresh_from_db()
    tenant_services.invitation_create(
        organization=org, email="new@example.com", role="viewer", actor=Actor(user=owner)
    )
    with caplog.at_level(logging.ERROR, logger="outbox.services"):
        assert outbox_drain() == 0
    message = Message.objects.get(handler="tenants.services.invitation_mail_send")
    assert (message.state, message.attempts) == (Message.State.DEAD, 1)
    assert message.last_error.startswith("BadHeaderError")
    assert "given up at once" in caplog.text and mail.outbox == []


def backdate(message: Message, *, by: timedelta) -> None:
    """As if the message had been written (and owed since) `by` ago."""
    Message.objects.filter(pk=message.pk).update(
        created_at=message.created_at - by, owed_since=message.created_at - by
    )


@pytest.mark.django_db
def test_a_given_up_message_an_operator_tries_again_is_retried_for_the_whole_give_up_age_again(
    effects, tmp_path, settings, admin_client
):
    settings.OUTBOX_GIVE_UP_AFTER_S = 3600
    blocker = tmp_path / "down"
    blocker.touch()
    message = message_enqueue(
        handler=handlers.fail_while_file_exists,
        payload={"path": str(effects), "blocker": str(blocker)},
    )
    backdate(message, by=timedelta(hours=2))
    outbox_drain()
    message.refresh_from_db()
    assert message.state == Message.State.DEAD

    # The far end is still down when the operator asks for another try in the admin.
    response = admin_client.post(
        reverse("admin:outbox_message_changelist"),
        {"action": "retry_now", "_selected_action": [message.pk]},
    )
    assert response.status_code == 302
    tried_again = timezone.now()
    assert outbox_drain(now=tried_again) == 0
    message.refresh_from_db()
    assert (message.state, message.attempts) == (Message.State.PENDING, 2)
    # Retried with backoff for the whole give-up age from the operator's nudge, then given up.
    assert outbox_drain(now=tried_again + timedelta(minutes=59)) == 0
    message.refresh_from_db()
    assert message.state == Message.State.PENDING
    outbox_drain(now=tried_again + timedelta(minutes=61))
    message.refresh_from_db()
    assert message.state == Message.State.DEAD

    blocker.unlink()
    admin_client.post(
        reverse("admin:outbox_message_changelist"),
        {"action": "retry_now", "_selected_action": [message.pk]},
    )
    assert outbox_drain() == 1
    assert lines(effects) == ["delivered"]


@pytest.mark.django_db
def test_a_message_being_delivered_is_not_delivered_again_at_the_same_time(effects):
    message_enqueue(
        handler=handlers.deliver_myself_again, payload={"path": str(effects), "key": "k"}, key="k"
    )
    assert outbox_drain() == 1
    assert lines(effects) == ["second delivery ran: False"]


@pytest.mark.django_db
def test_a_claim_left_by_a_deliverer_that_died_lapses(effects, settings):
    message = message_enqueue(
        handler=handlers.append_line, payload={"path": str(effects), "line": "late"}
    )
    now = timezone.now()
    Message.objects.filter(pk=message.pk).update(claimed_until=now + timedelta(seconds=60))
    assert outbox_drain(now=now) == 0
    assert outbox_drain(now=now + timedelta(seconds=61)) == 1
    assert lines(effects) == ["late"]


def test_backoff_doubles_and_is_capped(settings):
    settings.OUTBOX_BACKOFF_BASE_S = 10
    settings.OUTBOX_BACKOFF_MAX_S = 3600
    assert [backoff_s(n) for n in (1, 2, 3, 4)] == [10, 20, 40, 80]
    assert backoff_s(30) == 3600


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_an_effect_owed_while_the_broker_is_down_is_delivered_by_a_worker_once_it_is_back(
    effects, tmp_path, caplog
):
    """The change commits with the broker down (the send after commit fails and is only
    logged); once the broker is back, beat's drain has a real worker deliver it, once."""
    broker = RedisServer(tmp_path)
    broker.start()
    broker.stop()
    with (
        celery_broker(broker.url),
        override_settings(REDIS_URL=broker.url, CELERY_BROKER_URL=broker.url),
    ):
        with caplog.at_level(logging.WARNING, logger="outbox.services"), transaction.atomic():
            message_enqueue(
                handler=handlers.append_line, payload={"path": str(effects), "line": "owed"}
            )
        message = Message.objects.get()
        assert f"outbox message {message.pk} waits for the next drain" in caplog.text
        assert message.state == Message.State.PENDING
        assert lines(effects) == []

        broker.start()
        pool = Pool(tmp_path)
        pool.env["OUTBOX_DRAIN_EVERY_S"] = "0.5"
        try:
            pool.start_control_plane()
            wait_for(
                lambda: Message.objects.filter(pk=message.pk, state="sent").exists(),
                timeout=60,
                what="the worker to deliver the owed message",
            )
        except AssertionError:
            print(pool.logs())
            raise
        finally:
            pool.stop()
            broker.stop()
    assert lines(effects) == ["owed"]
