"""Shared fixtures. Nothing here starts a service: PostgreSQL and Redis are already running."""

import pytest
from django.core.cache import cache
from rest_framework.test import APIClient

from tenants.actors import Actor
from tenants.services import api_key_create
from tests import dbtemplate
from tests.factories import MembershipFactory, OrganizationFactory, UserFactory

pytest_plugins = [
    "pytester",
    "tests.migrated_state",
    "tests.s3server",
    "tests.pool",
    "tests.smtp",
    "tests.chaos.redis_server",
    "tests.process_guard",
]


# What makes a test slow: it starts real processes (pool workers, beat, a browser, an S3 or a
# Redis server of its own) or sweeps inputs by the thousand. `make test-fast` leaves these out.
SLOW_FIXTURES = frozenset(
    {
        "pool",
        "sandboxed_pool",
        "stack",
        "s3_server",
        "browser",
        "page",
        "broker_down",
        "live_server",
    }
)
SLOW_FOLDERS = ("tests/e2e/", "tests/chaos/", "tests/fuzz/")


@pytest.fixture(scope="session")
def _test_databases_from_template(django_db_use_migrations):
    """Each PostgreSQL test database is cloned from a migrated template (tests/dbtemplate.py)."""
    if not django_db_use_migrations:
        yield
        return
    with dbtemplate.cloning_test_databases():
        yield


@pytest.fixture(scope="session")
def django_db_setup(_test_databases_from_template, django_db_setup, django_db_blocker):
    """pytest-django's django_db_setup (--reuse-db, --create-db, the teardown) but for how each
    test database is created: cloned from a template that the migrations ran into once, not
    migrated in every pytest process (11 to 19 s each here; the template is kept for the next
    run); and transactional tests end by restoring the migrated rows (tests/migrated_state.py)."""
    from tests import migrated_state  # a plugin (pytest_plugins): imported once pytest loaded it

    with migrated_state.restoring(django_db_blocker):
        yield django_db_setup


@pytest.fixture(autouse=True)
def _clear_cache():
    """Rate-limit counters live in Redis; each test starts with none."""
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def org(db):
    return OrganizationFactory()


@pytest.fixture
def other_org(db):
    return OrganizationFactory()


@pytest.fixture
def member_factory(db):
    def make(organization, role="developer", **kwargs):
        return MembershipFactory(organization=organization, role=role, **kwargs).user

    return make


@pytest.fixture
def owner(org, member_factory):
    return member_factory(org, "owner")


@pytest.fixture
def api_client():
    return APIClient()


@pytest.fixture
def client_for(db):
    """An API client signed in as `user` (session auth)."""

    def make(user):
        client = APIClient()
        client.force_login(user)
        return client

    return make


@pytest.fixture
def key_client_for(db):
    """An API client authenticated with a fresh key of `user` in `organization`."""

    def make(user, organization, scopes=None):
        from tenants.scopes import scopes_for_role
        from tenants.selectors import membership_get

        role = membership_get(organization=organization, user=user).role
        _key, token = api_key_create(
            organization=organization,
            name="test key",
            scopes=sorted(scopes if scopes is not None else scopes_for_role(role)),
            actor=Actor(user=user),
        )
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
        return client

    return make


@pytest.fixture
def user(db):
    return UserFactory()


@pytest.hookimpl(tryfirst=True)  # before -m reads the marks
def pytest_collection_modifyitems(items):
    """Mark the slow tests (SLOW_FIXTURES, SLOW_FOLDERS) for `make test-fast` to leave out."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & SLOW_FIXTURES or item.nodeid.startswith(SLOW_FOLDERS):
            item.add_marker(pytest.mark.slow)
