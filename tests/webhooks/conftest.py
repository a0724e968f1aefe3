"""Fixtures of the webhook tests: a real receiver on this machine (private addresses opened for
it, as only tests do) and an endpoint of the organization pointing at it."""

import pytest

from tenants.actors import Actor
from webhooks.events import EVENT_TYPES
from webhooks.services import endpoint_create

from .receiver import Receiver


@pytest.fixture
def receiver():
    started = Receiver().start()
    yield started
    started.stop()


@pytest.fixture
def local_receivers(settings):
    settings.WEBHOOKS_ALLOW_PRIVATE_ADDRESSES = True
    settings.WEBHOOKS_TIMEOUT_S = 3.0


@pytest.fixture
def endpoint(org, owner, receiver, local_receivers):
    """An endpoint subscribed to every event type; `.secret` is the secret shown at creation."""
    made, secret = endpoint_create(
        organization=org, url=receiver.url, event_types=list(EVENT_TYPES), actor=Actor(user=owner)
    )
    made.secret = secret
    return made
