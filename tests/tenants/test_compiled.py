"""tenants.compiled.CompiledRows answers what its queryset answers, for every value it is run
with, and falls back to the queryset where a value does not reach the SQL as a parameter."""

from datetime import UTC, datetime, timedelta

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db.models import Count, F, Value
from django.db.models.functions import Concat, TruncDate

from tenants.compiled import CompiledRows
from tenants.models import AuditEvent

pytestmark = pytest.mark.django_db


def _events(org, when: datetime, n: int) -> None:
    for i in range(n):
        AuditEvent.objects.create(
            organization=org,
            actor_label="a",
            action=f"act.{i % 2}",
            target_type="t",
            target_id=str(i),
            target_label="x",
        )
    AuditEvent.objects.filter(organization=org).update(created_at=when)


def _by_action(*, organization: int, since: datetime):
    # Annotations before values(): the row's columns come in another order than the names.
    return (
        AuditEvent.objects.filter(organization=organization, created_at__gte=since)
        .annotate(label=Concat(F("action"), Value("!")), day=TruncDate("created_at", tzinfo=UTC))
        .values("label", "day", "action")
        .annotate(n=Count("pk"))
        .order_by("action")
    )


def test_each_run_answers_its_own_values_like_the_queryset(org, other_org):
    now = datetime.now(UTC)
    _events(org, now, 3)
    _events(other_org, now - timedelta(days=3), 5)
    compiled = CompiledRows(_by_action, organization=int, since=datetime)
    for organization, since in [
        (org.pk, now - timedelta(days=1)),
        (other_org.pk, now - timedelta(days=1)),
        (other_org.pk, now - timedelta(days=5)),
        (org.pk, now + timedelta(days=1)),
    ]:
        got = compiled.rows(organization=organization, since=since)
        assert got == list(_by_action(organization=organization, since=since))
        assert [list(row) for row in got] == [["label", "day", "action", "n"]] * len(got)
    assert compiled.rows(organization=org.pk, since=now - timedelta(days=1))[0]["n"] == 2


def test_a_value_that_is_no_parameter_runs_the_queryset(org):
    _events(org, datetime.now(UTC), 2)

    def limited(*, organization: int, limit: int):  # a LIMIT is written into the SQL's text
        return AuditEvent.objects.filter(organization=organization).values("pk")[: abs(limit)]

    compiled = CompiledRows(limited, organization=int, limit=int)
    assert len(compiled.rows(organization=org.pk, limit=1)) == 1
    assert len(compiled.rows(organization=org.pk, limit=2)) == 2


def test_only_values_querysets_compile(org):
    compiled = CompiledRows(
        lambda *, organization: AuditEvent.objects.filter(pk=organization), organization=int
    )
    with pytest.raises(ImproperlyConfigured):
        compiled.rows(organization=org.pk)


def test_text_values_are_parameters_and_a_rewritten_one_runs_the_queryset(org, other_org):
    _events(org, datetime.now(UTC), 3)
    _events(other_org, datetime.now(UTC), 1)

    def by_action(*, organization: int, action: str):
        return AuditEvent.objects.filter(organization=organization, action=action).values("pk")

    compiled = CompiledRows(by_action, organization=int, action=str)
    for organization, action in [(org.pk, "act.0"), (org.pk, "act.1"), (other_org.pk, "act.0")]:
        got = compiled.rows(organization=organization, action=action)
        assert got == list(by_action(organization=organization, action=action))
    assert len(compiled.rows(organization=org.pk, action="act.0")) == 2
    assert compiled.rows(organization=org.pk, action="act.%") == []  # a parameter, not a pattern
    assert compiled._statements["default"] is not None

    def by_prefix(*, organization: int, prefix: str):  # startswith writes the value as prefix%
        return AuditEvent.objects.filter(organization=organization, action__startswith=prefix)

    prefixed = CompiledRows(lambda **v: by_prefix(**v).values("pk"), organization=int, prefix=str)
    assert len(prefixed.rows(organization=org.pk, prefix="act.")) == 3
    assert prefixed._statements["default"] is None


def test_a_column_that_starts_at_zero_and_a_wrapped_value_compile_too(org, other_org):
    """A version number (PositiveIntegerField) refuses a negative stand-in, and psycopg wraps the
    value it is compared with (Int4): the statement still compiles once and answers each run."""
    from registry.models import DatasetVersion
    from tests.factories import DatasetVersionFactory

    mine = [DatasetVersionFactory(organization=org) for _ in range(2)]
    theirs = DatasetVersionFactory(organization=other_org)

    def numbered(*, organization: int, number: int):
        return DatasetVersion.objects.filter(organization=organization, number=number).values("pk")

    compiled = CompiledRows(numbered, organization=int, number=int)
    for version in [*mine, theirs]:
        assert compiled.rows(organization=version.organization_id, number=version.number) == [
            {"pk": version.pk}
        ]
    assert compiled.rows(organization=org.pk, number=10**6) == []
    assert compiled._statements["default"] is not None
