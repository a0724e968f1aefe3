"""Test databases cloned from a migrated template (tests/conftest.py's django_db_setup).

Every pytest process (each xdist worker, the serial run) used to create its test database by
running all the migrations, 11 to 19 s each here. Instead the migrations run once, into a
template database named after a digest of what determines the schema, and each process creates
its database with `CREATE DATABASE <test db> TEMPLATE <template>`, as Django's own parallel
runner clones its databases (postgresql's DatabaseCreation._clone_test_db).

- The template is `test_<NAME>_tmpl_<digest>`; the digest covers every installed app's migration
  files (the project's, Django's, allauth's), the models module of an app without migrations,
  INSTALLED_APPS, the Django version and the database's engine, name and charset. A schema of
  another digest is another name, so a changed migration builds a new template, and the older
  ones of the same prefix are dropped then.
- Processes starting together agree through a PostgreSQL advisory lock held on a connection to
  the maintenance database: cloning holds it shared, building holds it exclusive. A template is
  built under a temporary name and renamed when complete, so a half-built one never bears the
  template's name; it is marked IS_TEMPLATE with ALLOW_CONNECTIONS false, so no session stays
  connected to it (CREATE DATABASE ... TEMPLATE refuses a template with sessions).
- The template stays after the run: the next run on the same server skips the migrations.

Only PostgreSQL databases that migrate take this path; any other engine (SQLite), `--nomigrations`
or a database with its own TEST TEMPLATE keeps Django's create_test_db.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from django.db import DatabaseError

# The shared/exclusive advisory lock's key space: pg_advisory_lock(bigint).
_LOCK_KEY_BITS = 63
_TEMPLATE_INFIX = "_tmpl_"
_DIGEST_CHARS = 12
_BUILDING_SUFFIX = "_new"
_MAX_IDENTIFIER = 63  # PostgreSQL's NAMEDATALEN - 1


def schema_files() -> dict[str, Path]:
    """Every file that determines the migrated schema, by a name of its own: each installed
    app's migration modules (its migrations package, walked), or its models module where it has
    no migrations."""
    from django.apps import apps
    from django.db.migrations.loader import MigrationLoader

    files = {}
    for app_config in apps.get_app_configs():
        module_name, _explicit = MigrationLoader.migrations_module(app_config.label)
        spec = importlib.util.find_spec(module_name) if module_name else None
        if spec is not None and spec.submodule_search_locations:
            for folder in map(Path, spec.submodule_search_locations):
                for path in sorted(folder.rglob("*.py")):
                    files[f"{module_name}:{path.relative_to(folder)}"] = path
        elif app_config.models_module is not None and app_config.models_module.__file__:
            files[app_config.models_module.__name__] = Path(app_config.models_module.__file__)
    return files


def schema_digest(files: dict[str, Path], facts: list[str]) -> str:
    """A digest of the files' names and contents, and of the facts (versions, settings)."""
    digest = hashlib.sha256()
    for fact in facts:
        digest.update(fact.encode() + b"\0")
    for name in sorted(files):
        digest.update(name.encode() + b"\0")
        digest.update(files[name].read_bytes() + b"\0")
    return digest.hexdigest()


def schema_facts(settings_dict: dict) -> list[str]:
    import django
    from django.apps import apps

    return [
        f"django {django.get_version()}",
        f"engine {settings_dict['ENGINE']}",
        f"name {settings_dict['NAME']}",
        f"charset {settings_dict['TEST'].get('CHARSET')}",
        "apps " + ",".join(app.name for app in apps.get_app_configs()),
    ]


def template_prefix(settings_dict: dict) -> str:
    from django.db.backends.base.creation import TEST_DATABASE_PREFIX

    room = _MAX_IDENTIFIER - len(_TEMPLATE_INFIX) - _DIGEST_CHARS - len(_BUILDING_SUFFIX)
    return (TEST_DATABASE_PREFIX + settings_dict["NAME"])[:room] + _TEMPLATE_INFIX


def template_name(settings_dict: dict) -> str:
    digest = schema_digest(schema_files(), schema_facts(settings_dict))
    return template_prefix(settings_dict) + digest[:_DIGEST_CHARS]


def lock_key(prefix: str) -> int:
    """One advisory lock per template prefix: builds of any digest exclude each other."""
    value = int.from_bytes(hashlib.sha256(prefix.encode()).digest()[:8], "big")
    return value >> (64 - _LOCK_KEY_BITS)


def _exists(cursor, name: str) -> bool:
    cursor.execute("SELECT 1 FROM pg_catalog.pg_database WHERE datname = %s", [name])
    return cursor.fetchone() is not None


def _drop(cursor, quote: Callable[[str], str], name: str) -> None:
    """Drop a database, template or not (PostgreSQL refuses to drop a template)."""
    if _exists(cursor, name):
        cursor.execute(f"ALTER DATABASE {quote(name)} WITH IS_TEMPLATE false")
        cursor.execute(f"DROP DATABASE {quote(name)}")


def _drop_stale(cursor, quote, prefix: str, keep: str, log: Callable[[str], None]) -> None:
    """Drop the templates of this prefix but `keep` (older digests, an interrupted build's)."""
    pattern = prefix.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%") + "%"
    cursor.execute(
        "SELECT datname FROM pg_catalog.pg_database WHERE datname LIKE %s AND datname <> %s",
        [pattern, keep],
    )
    for (name,) in cursor.fetchall():
        try:
            _drop(cursor, quote, name)
        except DatabaseError as error:  # in use by someone: leave it
            log(f"Left the stale test database template {name}: {error}")
        else:
            log(f"Dropped the stale test database template {name}")


def ensure_and_clone(
    *,
    nodb_cursor: Callable,
    quote: Callable[[str], str],
    prefix: str,
    template: str,
    target: str,
    build: Callable[[str], None],
    keepdb: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> bool:
    """Create `target` from `template`, first building the template (`build(temporary_name)`)
    if it is absent. Returns whether this call built it.

    `nodb_cursor()` opens a connection to the maintenance database; the advisory lock lives on
    it: shared while cloning, exclusive while building (and cloning after). With `keepdb`, an
    existing `target` is left as it is."""
    key = lock_key(prefix)
    built = False
    with nodb_cursor() as cursor:
        try:
            cursor.execute("SELECT pg_advisory_lock_shared(%s)", [key])
            if not _exists(cursor, template):
                cursor.execute("SELECT pg_advisory_unlock_shared(%s)", [key])
                cursor.execute("SELECT pg_advisory_lock(%s)", [key])
                if not _exists(cursor, template):
                    building = template + _BUILDING_SUFFIX
                    _drop(cursor, quote, building)
                    log(f"Building the test database template {template} (migrations)...")
                    build(building)
                    cursor.execute(
                        f"ALTER DATABASE {quote(building)}"
                        " WITH IS_TEMPLATE true ALLOW_CONNECTIONS false"
                    )
                    cursor.execute(f"ALTER DATABASE {quote(building)} RENAME TO {quote(template)}")
                    built = True
                    _drop_stale(cursor, quote, prefix, template, log)
            if _exists(cursor, target):
                if keepdb:
                    return built
                log(f"Destroying old test database {target}...")
                cursor.execute(f"DROP DATABASE {quote(target)}")
            cursor.execute(f"CREATE DATABASE {quote(target)} WITH TEMPLATE {quote(template)}")
        finally:
            cursor.execute("SELECT pg_advisory_unlock_all()")
    return built


def _template_create_test_db(
    connection, original: Callable, verbosity=1, autoclobber=False, serialize=True, keepdb=False
):
    """DatabaseCreation.create_test_db, the test database cloned from the template."""
    from django.conf import settings
    from django.core.management import call_command

    creation = connection.creation
    settings_dict = connection.settings_dict
    alias = connection.alias
    test_name = creation._get_test_db_name()
    if keepdb:
        with creation._nodb_cursor() as cursor:
            if _exists(cursor, test_name):
                # --reuse-db with the database there: Django's way (migrate what is missing).
                return original(verbosity, autoclobber, serialize, keepdb)
    original_name = settings_dict["NAME"]
    prefix = template_prefix(settings_dict)
    template = template_name(settings_dict)

    def log(message):
        if verbosity >= 1:
            creation.log(message)

    def build(building: str) -> None:
        test_settings = settings_dict["TEST"]
        own_test_name = test_settings.get("NAME")
        test_settings["NAME"] = building
        try:
            original(max(verbosity - 1, 0), True, False, False)
        finally:
            test_settings["NAME"] = own_test_name
            connection.close()
            connection.close_pool()
            settings.DATABASES[alias]["NAME"] = original_name
            settings_dict["NAME"] = original_name

    if verbosity >= 1:
        shown = creation._get_database_display_str(verbosity, test_name)
        creation.log(f"Creating test database for alias {shown} from {template}...")
    connection.close()
    ensure_and_clone(
        nodb_cursor=creation._nodb_cursor,
        quote=creation._quote_name,
        prefix=prefix,
        template=template,
        target=test_name,
        build=build,
        keepdb=keepdb,
        log=log,
    )
    settings.DATABASES[alias]["NAME"] = test_name
    settings_dict["NAME"] = test_name
    creation.cloned_from = template
    if serialize:
        connection._test_serialized_contents = creation.serialize_db_to_string()
    call_command("createcachetable", database=alias)
    connection.ensure_connection()
    return test_name


def clones_from_template(connection) -> bool:
    test_settings = connection.settings_dict["TEST"]
    return (
        connection.vendor == "postgresql"
        and test_settings.get("MIGRATE", True) is not False
        and not test_settings.get("TEMPLATE")
    )


@contextmanager
def cloning_test_databases() -> Iterator[None]:
    """While open, each PostgreSQL connection's create_test_db clones from the template."""
    from django.db import connections

    patched = []
    for connection in connections.all(initialized_only=False):
        if clones_from_template(connection):
            creation = connection.creation
            original = creation.create_test_db

            def create_test_db(*args, _connection=connection, _original=original, **kwargs):
                return _template_create_test_db(_connection, _original, *args, **kwargs)

            creation.create_test_db = create_test_db
            patched.append(creation)
    try:
        yield
    finally:
        for creation in patched:
            del creation.create_test_db
