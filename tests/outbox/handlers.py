"""Outbox handlers for the outbox's own tests: their effects are lines in a file, so a worker
process's deliveries can be seen (and counted) from the test."""

from pathlib import Path

from outbox.models import Message
from outbox.services import handler, message_deliver


@handler(retry_on=(OSError,))
def append_line(*, path: str, line: str) -> None:
    with Path(path).open("a") as file:
        file.write(line + "\n")


@handler(retry_on=(OSError,))
def fail_while_file_exists(*, path: str, blocker: str) -> None:
    """Fails as a far end that is down does, until the test removes `blocker`."""
    if Path(blocker).exists():
        raise ConnectionRefusedError(f"far end down ({blocker} exists)")
    append_line(path=path, line="delivered")


@handler(retry_on=())
def deliver_myself_again(*, path: str, key: str) -> None:
    """A second deliverer arriving while the first still runs the handler."""
    again = message_deliver(message_id=Message.objects.get(key=key).pk)
    append_line(path=path, line=f"second delivery ran: {again}")


@handler(retry_on=(OSError,))
def fail_with_a_bug(*, path: str) -> None:
    """A bug, not a far end that is down: trying again cannot help."""
    raise KeyError("invoice_id")


def not_a_handler(*, path: str) -> None:
    append_line(path=path, line="unmarked function called")
