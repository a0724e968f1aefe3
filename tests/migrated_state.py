"""Transactional tests end by putting the database back as the migrations left it, cheaply.

Django's way (`serialized_rollback=True`) is to TRUNCATE every table after the test, then, at the
start of the next transactional test, to save the serialized rows of the migrations one model
instance at a time: about 2.5 s plus 1 to 2.5 s per transactional test on this 2-core machine,
and a non-transactional test that runs after one finds the database empty (which is why
pytest-django runs them last, where their waits on real processes pile up at the end of the run).

Here the rows the migrations wrote are copied once per test database into the `migrated` schema,
and a transactional test's teardown deletes every row of every table and copies those back: one
batch of statements, tens of milliseconds. Between tests the database is always as migrated, so
tests may run in any order (`pytest_collection_modifyitems` below).
"""

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from django.db import connections

SCHEMA = "migrated"


def _tables(connection) -> list[str]:
    return sorted(connection.introspection.django_table_names(only_existing=True))


def _snapshot(connection) -> None:
    """Copy the rows the migrations wrote (content types, permissions, resource classes...)."""
    quote = connection.ops.quote_name
    connection.migrated_tables, connection.migrated_rows = _tables(connection), []
    with connection.cursor() as cursor:
        cursor.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; CREATE SCHEMA {SCHEMA}")
        for table in connection.migrated_tables:
            cursor.execute(f"SELECT EXISTS (SELECT 1 FROM {quote(table)})")  # noqa: S608
            if cursor.fetchone()[0]:
                cursor.execute(f"CREATE TABLE {SCHEMA}.{quote(table)} AS TABLE {quote(table)}")
                connection.migrated_rows.append(table)


def restore(connection) -> None:
    """Every table back to the snapshot, in one transaction (foreign keys checked at commit)."""
    quote = connection.ops.quote_name
    statements = ["SET CONSTRAINTS ALL DEFERRED"]
    statements += [f"DELETE FROM {quote(table)}" for table in connection.migrated_tables]  # noqa: S608
    statements += [
        f"INSERT INTO {quote(table)} SELECT * FROM {SCHEMA}.{quote(table)}"  # noqa: S608
        for table in connection.migrated_rows
    ]
    connection.ensure_connection()
    # One round trip, never prepared (it is the same text every time: psycopg would prepare it,
    # and a prepared statement holds one command).
    connection.connection.execute("BEGIN; " + "; ".join(statements) + "; COMMIT", prepare=False)


def _restore_after_the_test(self) -> None:
    """Replaces TransactionTestCase._fixture_teardown (its flush) for the test databases."""
    for alias in self._databases_names(include_mirrors=False):
        restore(connections[alias])


@contextmanager
def restoring(django_db_blocker) -> Iterator[None]:
    """While open, transactional tests end by restoring the test databases' snapshots (taken
    here) instead of Django's flush; tests/conftest.py's django_db_setup holds it open."""
    from django.test import TransactionTestCase

    databases = connections.all(initialized_only=False)
    if any(connection.vendor != "postgresql" for connection in databases):
        yield  # Django's own flush
        return
    with django_db_blocker.unblock():
        for connection in databases:
            _snapshot(connection)
            # A test that still asks for serialized_rollback finds the database as migrated,
            # whatever ran before it: nothing to deserialize at its start.
            if hasattr(connection, "_test_serialized_contents"):
                del connection._test_serialized_contents
    flush = TransactionTestCase._fixture_teardown
    TransactionTestCase._fixture_teardown = _restore_after_the_test
    try:
        yield
    finally:
        TransactionTestCase._fixture_teardown = flush


def _heavy(item) -> bool:
    """Starts real processes or waits on them: a transactional test, or one marked slow."""
    marker = item.get_closest_marker("django_db")
    transactional = marker is not None and (
        marker.kwargs.get("transaction") or marker.kwargs.get("reset_sequences")
    )
    fixtures = getattr(item, "fixturenames", ())
    return bool(
        transactional
        or "transactional_db" in fixtures
        or "live_server" in fixtures
        or item.get_closest_marker("slow")
    )


# The share of the run, from its end, left to quick modules only: the two xdist workers finish
# close together when the last tests are short.
QUICK_TAIL = 0.15


@pytest.hookimpl(trylast=True)  # after pytest-django's sort, which it replaces
def pytest_collection_modifyitems(items):
    """Spread the modules that wait on real processes through the run, module by module.

    pytest-django puts transactional tests last (after one, Django's flush had emptied the
    database); here they leave it as migrated, so no order is needed. Put last, the waits of
    some 60 process tests met at the end of the run and left half the CPU idle for minutes;
    spread, one xdist worker computes while the other waits. Modules stay whole (their
    module-scoped fixtures are built once), and the order depends only on the collection, so
    every xdist worker computes the same one.
    """
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    heavy, quick = [], []
    for tests in modules.values():
        (heavy if any(map(_heavy, tests)) else quick).append(tests)
    spread = (1 - QUICK_TAIL) * sum(map(len, quick))
    ordered, placed = [], 0
    for index, tests in enumerate(heavy):
        due = spread * index / max(len(heavy), 1)
        while quick and placed < due:
            placed += len(quick[0])
            ordered += quick.pop(0)
        ordered += tests
    for tests in quick:
        ordered += tests
    items[:] = ordered
