"""A mail server of the test's own: `smtp_down` points Django's SMTP backend at a free port where
nothing listens yet; `.listen()` starts a real SMTP server (aiosmtpd) there, whose `.envelopes`
are what it received."""

from __future__ import annotations

import contextlib
import socket

import pytest
from aiosmtpd.controller import Controller


class _Inbox:
    def __init__(self):
        self.envelopes = []

    async def handle_DATA(self, server, session, envelope):
        self.envelopes.append(envelope)
        return "250 Message accepted for delivery"


class MailServer:
    def __init__(self, port: int):
        self.port = port
        self.inbox = _Inbox()

    @property
    def envelopes(self) -> list:
        return self.inbox.envelopes

    @contextlib.contextmanager
    def listen(self):
        controller = Controller(self.inbox, hostname="127.0.0.1", port=self.port)
        controller.start()
        try:
            yield self
        finally:
            controller.stop()


@pytest.fixture
def smtp_down(settings) -> MailServer:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", port
    settings.EMAIL_HOST_USER = settings.EMAIL_HOST_PASSWORD = ""
    settings.EMAIL_USE_TLS = settings.EMAIL_USE_SSL = False
    settings.EMAIL_TIMEOUT = 5
    return MailServer(port)
