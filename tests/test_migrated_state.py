"""The suite's own machinery: transactional tests restore the migrated database; the order."""

from itertools import pairwise
from types import SimpleNamespace

import pytest
from django.contrib.auth.models import Permission
from django.contrib.contenttypes.models import ContentType
from django.db import connection

from jobs.models import ResourceClass
from tests import migrated_state
from tests.factories import JobFactory, MembershipFactory


def _contents() -> dict[str, str]:
    """Every table's rows, as one digest per table."""
    quote = connection.ops.quote_name
    digests = {}
    with connection.cursor() as cursor:
        for table in migrated_state._tables(connection):
            cursor.execute(
                f"SELECT count(*), md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) "  # noqa: S608
                f"FROM {quote(table)} t"
            )
            digests[table] = cursor.fetchone()
    return digests


@pytest.mark.django_db(transaction=True)
def test_a_transactional_test_leaves_the_database_exactly_as_migrated():
    migrated = _contents()
    assert migrated["jobs_resourceclass"][0] > 0, "the migrations' rows are there to restore"
    # What a test does: new rows across related tables, changed and deleted migrated rows.
    JobFactory(organization=MembershipFactory().organization)
    ResourceClass.objects.filter(name="cpu").update(display_name="changed")
    Permission.objects.filter(content_type__app_label="jobs").delete()
    ContentType.objects.filter(app_label="webhooks").delete()
    assert _contents() != migrated

    migrated_state.restore(connection)

    assert _contents() == migrated


def _item(nodeid, *, heavy=False):
    def marker(name):
        if name == "django_db" and heavy:
            return SimpleNamespace(kwargs={"transaction": True})
        return None

    return SimpleNamespace(nodeid=nodeid, fixturenames=(), get_closest_marker=marker)


def test_process_modules_are_spread_whole_and_the_tail_is_quick():
    items = [_item(f"tests/quick_{m}.py::t{n}") for m in range(20) for n in range(10)]
    items += [_item(f"tests/heavy_{m}.py::t{n}", heavy=n == 0) for m in range(4) for n in range(3)]

    migrated_state.pytest_collection_modifyitems(items)

    modules = [item.nodeid.split("::")[0] for item in items]
    runs = [m for i, m in enumerate(modules) if i == 0 or modules[i - 1] != m]
    assert len(runs) == len(set(runs)) == 24, "each module stays whole"
    starts = [modules.index(f"tests/heavy_{m}.py") for m in range(4)]
    assert starts == sorted(starts)
    assert starts[0] == 0 and min(b - a for a, b in pairwise(starts)) >= 40
    assert all(m.startswith("tests/quick_") for m in modules[-30:]), "the last 15% is quick"
