"""The test databases' template (tests/dbtemplate.py): which files name it, and that it is built
once, under a lock, and cloned after. The build/clone tests run against the real PostgreSQL with
empty databases of their own prefix, so they neither need nor touch the suite's template."""

import threading
import uuid

import pytest
from django.conf import settings
from django.db import connection

from tests import dbtemplate
from tests.processes import wait_for


def test_the_digest_follows_every_migration_file_and_fact(tmp_path):
    first = tmp_path / "0001_initial.py"
    second = tmp_path / "0002_more.py"
    first.write_text("operations = []\n")
    second.write_text("operations = ['a field']\n")
    files = {"app.migrations:0001_initial.py": first, "app.migrations:0002_more.py": second}
    facts = ["django 5.2", "name fs"]
    digest = dbtemplate.schema_digest(files, facts)

    assert dbtemplate.schema_digest(files, facts) == digest
    second.write_text("operations = ['another field']\n")
    changed = dbtemplate.schema_digest(files, facts)
    assert changed != digest
    assert dbtemplate.schema_digest(files, ["django 5.3", "name fs"]) != changed
    assert dbtemplate.schema_digest(files, ["django 5.2", "name other"]) != changed
    renamed = {"other.migrations:0001_initial.py": first, "app.migrations:0002_more.py": second}
    assert dbtemplate.schema_digest(renamed, facts) != changed
    assert dbtemplate.schema_digest({"app.migrations:0001_initial.py": first}, facts) != changed


def test_the_schema_files_are_every_installed_apps_migrations():
    files = dbtemplate.schema_files()

    # Each project app's migrations, all of them; Django's and allauth's too.
    for app in ("outbox", "tenants", "registry", "jobs", "billing", "serving", "webhooks"):
        folder = settings.BASE_DIR / app / "migrations"
        named = {path for name, path in files.items() if name.startswith(f"{app}.migrations:")}
        assert named == set(folder.rglob("*.py")), app
        assert len(named) > 1, app
    assert "django.contrib.auth.migrations:0001_initial.py" in files
    assert any(name.startswith("allauth.account.migrations:") for name in files)


@pytest.mark.django_db
def test_this_process_cloned_its_database_from_a_closed_template(request):
    """The override is in place: the database under test came from the template, which is
    marked a template that takes no connections."""
    assert "create_test_db" in vars(connection.creation)
    if request.config.getvalue("reuse_db"):
        return  # an existing database is reused as it is
    template = connection.creation.cloned_from
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT datistemplate, datallowconn FROM pg_database WHERE datname = %s", [template]
        )
        assert cursor.fetchall() == [(True, False)]


@pytest.fixture
def scratch(django_db_blocker):
    """A database name base of this test's own; the databases it made are dropped after."""
    base = f"test_tmplcheck_{uuid.uuid4().hex[:8]}"
    with django_db_blocker.unblock():
        yield base
        with connection._nodb_cursor() as cursor:
            for name, _template, _connections in databases(base):
                dbtemplate._drop(cursor, connection.ops.quote_name, name)


def databases(base):
    with connection._nodb_cursor() as cursor:
        cursor.execute(
            "SELECT datname, datistemplate, datallowconn FROM pg_database"
            " WHERE datname LIKE %s ORDER BY datname",
            [base.replace("_", "\\_") + "%"],
        )
        return cursor.fetchall()


def _waiting_on_an_advisory_lock() -> bool:
    with connection._nodb_cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
        return cursor.fetchone() is not None


class Builds:
    """A stand-in for the migrations: creates the (empty) database and counts; with `rival`,
    finishes only once another process waits on the lock, so both really start together."""

    def __init__(self, fail=False, rival=False):
        self.names = []
        self.fail, self.rival = fail, rival

    def __call__(self, name):
        self.names.append(name)
        with connection._nodb_cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {connection.ops.quote_name(name)}")
        if self.rival:
            wait_for(_waiting_on_an_advisory_lock, timeout=30, what="the other process to wait")
        if self.fail:
            raise RuntimeError("a migration failed")


def clone(base, digest, suffix, build, keepdb=False):
    """What a pytest process does: its test database (`<base>_<suffix>`) from the template of
    the digest (`<base>_tmpl_<digest>`)."""
    return dbtemplate.ensure_and_clone(
        nodb_cursor=connection._nodb_cursor,
        quote=connection.ops.quote_name,
        prefix=f"{base}_tmpl_",
        template=f"{base}_tmpl_{digest}",
        target=f"{base}_{suffix}",
        build=build,
        keepdb=keepdb,
    )


def test_processes_starting_together_build_the_template_once_and_clone_it(scratch):
    # A build that failed half-way leaves only its temporary name: no template to clone.
    with pytest.raises(RuntimeError):
        clone(scratch, "aaaa", "gw0", Builds(fail=True))
    assert databases(scratch) == [(f"{scratch}_tmpl_aaaa_new", False, True)]

    # Two processes start at once: one builds (over the leftover), the other waits and clones.
    build = Builds(rival=True)
    results = {}

    def start(worker):
        results[worker] = clone(scratch, "aaaa", worker, build)

    workers = [threading.Thread(target=start, args=(name,)) for name in ("gw0", "gw1")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()

    assert build.names == [f"{scratch}_tmpl_aaaa_new"]
    assert sorted(results.values()) == [False, True]
    assert databases(scratch) == [
        (f"{scratch}_gw0", False, True),
        (f"{scratch}_gw1", False, True),
        (f"{scratch}_tmpl_aaaa", True, False),
    ]

    # A migration changed: another digest, another template; the older one is dropped (the
    # process's test database, kept with --reuse-db, is left as it is).
    assert clone(scratch, "bbbb", "gw1", Builds(), keepdb=True) is True
    assert databases(scratch) == [
        (f"{scratch}_gw0", False, True),
        (f"{scratch}_gw1", False, True),
        (f"{scratch}_tmpl_bbbb", True, False),
    ]
