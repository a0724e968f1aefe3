"""The SDK and CLI against a live server: pytest-django's live_server on the test database, local
storage whose upload URLs point at that server, and an API key in the environment."""

import os

import pytest
from factory_sdk.cli import app
from typer.testing import CliRunner

from tenants.actors import Actor
from tenants.scopes import scopes_for_role
from tenants.services import api_key_create
from tests.registry.conftest import local_store  # noqa: F401 (a fixture)

# live_server answers from another thread, so the test's rows must be committed.
live = pytest.mark.django_db(transaction=True)


@pytest.fixture
def server(live_server, settings, local_store):  # noqa: F811 (the fixture imported above)
    """The live server's address; presigned upload URLs point at it."""
    settings.SITE_URL = live_server.url
    return live_server.url


@pytest.fixture
def api_key(org, owner):
    """An owner's key in `org`: every scope the commands use."""
    _key, token = api_key_create(
        organization=org,
        name="cli",
        scopes=sorted(scopes_for_role("owner")),
        actor=Actor(user=owner),
    )
    return token


@pytest.fixture
def factory_env(server, api_key, tmp_path):
    """The environment commands run in: FACTORY_URL and FACTORY_API_KEY set, and config and
    cache folders of the test's own. A test changes it in place (None unsets a variable)."""
    return {
        **os.environ,
        "FACTORY_URL": server,
        "FACTORY_API_KEY": api_key,
        "FACTORY_PROFILE": None,
        "FACTORY_ORG": None,
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }


@pytest.fixture
def cli(factory_env):
    """Run `factory ARGS...` in this process; returns click's Result (stdout, stderr, code)."""
    runner = CliRunner()

    def run(*args, input=None):
        return runner.invoke(app, [str(arg) for arg in args], input=input, env=factory_env)

    return run
