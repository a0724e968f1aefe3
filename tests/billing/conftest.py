"""Fixtures for the Stripe tests: a fake Stripe API on a free local port, and the settings that
point the stripe library at it over real HTTP."""

import pytest

from tests.billing.stripe_server import StripeServer


@pytest.fixture
def stripe_server(settings):
    server = StripeServer().start()
    settings.STRIPE_SECRET_KEY = server.fake.api_key
    settings.STRIPE_WEBHOOK_SECRET = server.fake.webhook_secret
    settings.STRIPE_API_BASE = server.url
    settings.STRIPE_TIMEOUT_S = 2.0
    settings.STRIPE_PUSH_BACKOFF_S = 0.01
    settings.STRIPE_PUSH_BACKOFF_MAX_S = 0.1
    yield server
    server.stop()


@pytest.fixture
def fake_stripe(stripe_server):
    return stripe_server.fake


@pytest.fixture
def no_stripe(settings):
    settings.STRIPE_SECRET_KEY = ""
    settings.STRIPE_WEBHOOK_SECRET = ""
    settings.STRIPE_API_BASE = ""
