"""The tenancy seal, attacked from inside: org-scoped views (API and pages) written the ways that
used to lose the organization filter, and what a member of another organization then saw.

Each view is served through real routes (tests/security/seal_urls.py); the attacker is a member
of organization A who asks, through A's own slug, for organization B's jobs.
"""

import pytest
from django.views import View
from rest_framework import generics, permissions

from jobs.api.views import JobViewSet
from jobs.models import Job
from tenants.api.base import OrganizationScopedAPIView, OrganizationScopedMixin
from tenants.api.permissions import HasOrganizationScope, IsUserSession
from tenants.seal import SealBroken
from tenants.views.base import OrganizationPageMixin
from tests.factories import JobFactory, MembershipFactory, OrganizationFactory
from tests.security.seal_urls import NARROWINGS_WITHOUT_THE_FILTER, SOUND_NARROWINGS

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.security.seal_urls")]


@pytest.fixture
def attack(client):
    """Organization A with a member signed in and one job; organization B with one job."""
    own, other = OrganizationFactory(), OrganizationFactory()
    client.force_login(MembershipFactory(organization=own, role="developer").user)
    return client, own, JobFactory(organization=own), JobFactory(organization=other)


def _refused_or_rows(client, url):
    """None when the seal refused the request; else the job ids the response showed."""
    try:
        response = client.get(url)
    except SealBroken:
        return None
    if response.status_code != 200:
        return {"status": response.status_code}
    body = response.json()
    return sorted(row["id"] for row in body.get("results", [body]))


@pytest.mark.parametrize("narrowing", NARROWINGS_WITHOUT_THE_FILTER)
def test_an_api_list_whose_narrowing_loses_the_filter_is_refused(attack, narrowing):
    client, own, _mine, _theirs = attack
    seen = _refused_or_rows(client, f"/api/v1/orgs/{own.slug}/seal/{narrowing}/jobs/")
    assert seen is None, f"the {narrowing} narrowing was served; it showed jobs {seen}"


@pytest.mark.parametrize("narrowing", NARROWINGS_WITHOUT_THE_FILTER)
def test_an_api_object_whose_narrowing_loses_the_filter_is_refused(attack, narrowing):
    client, own, _mine, theirs = attack
    url = f"/api/v1/orgs/{own.slug}/seal/{narrowing}/jobs/{theirs.pk}/"
    seen = _refused_or_rows(client, url)
    assert seen is None, f"the {narrowing} narrowing was served; it showed {seen}"


def test_a_filter_backend_that_widens_the_rows_is_refused(attack):
    client, own, _mine, _theirs = attack
    seen = _refused_or_rows(client, f"/api/v1/orgs/{own.slug}/seal/backend/jobs/")
    assert seen is None, f"the filter backend was served; it showed jobs {seen}"


@pytest.mark.parametrize("narrowing", SOUND_NARROWINGS)
def test_narrowings_that_keep_the_filter_serve_only_the_organizations_rows(attack, narrowing):
    client, own, mine, theirs = attack
    seen = _refused_or_rows(client, f"/api/v1/orgs/{own.slug}/seal/{narrowing}/jobs/")
    assert seen == ([] if narrowing == "none" else [mine.pk])
    detail = client.get(f"/api/v1/orgs/{own.slug}/seal/{narrowing}/jobs/{theirs.pk}/")
    assert detail.status_code == 404


@pytest.mark.parametrize("narrowing", NARROWINGS_WITHOUT_THE_FILTER)
def test_a_page_whose_narrowing_loses_the_filter_is_refused(attack, narrowing):
    client, own, _mine, theirs = attack
    try:
        response = client.get(f"/o/{own.slug}/seal/{narrowing}/jobs/{theirs.pk}/")
    except SealBroken:
        return
    pytest.fail(f"the {narrowing} narrowing was served: {response.status_code} {response.content}")


@pytest.mark.parametrize("narrowing", SOUND_NARROWINGS)
def test_a_page_whose_narrowing_keeps_the_filter_finds_only_its_own_jobs(attack, narrowing):
    client, own, mine, theirs = attack
    assert client.get(f"/o/{own.slug}/seal/{narrowing}/jobs/{theirs.pk}/").status_code == 404
    expected = 404 if narrowing == "none" else 200
    assert client.get(f"/o/{own.slug}/seal/{narrowing}/jobs/{mine.pk}/").status_code == expected


@pytest.mark.parametrize("kind", ["api", "page"])
def test_a_handler_that_looks_up_the_raw_url_id_never_sees_another_tenants_object(attack, kind):
    """The base finds the URL's object through the organization before any handler runs."""
    client, own, mine, theirs = attack
    prefix = f"/api/v1/orgs/{own.slug}" if kind == "api" else f"/o/{own.slug}"
    response = client.get(f"{prefix}/seal/jobs/{theirs.pk}/recipe/")
    assert response.status_code == 404, response.content
    assert client.get(f"{prefix}/seal/jobs/{mine.pk}/recipe/").status_code == 200


@pytest.mark.parametrize("kind", ["api", "page"])
def test_a_url_id_without_a_model_to_find_it_in_is_refused(attack, kind):
    client, own, _mine, theirs = attack
    prefix = f"/api/v1/orgs/{own.slug}" if kind == "api" else f"/o/{own.slug}"
    with pytest.raises(SealBroken, match="names no model"):
        client.get(f"{prefix}/seal/unmodelled/{theirs.pk}/")


def test_a_view_on_the_bare_mixin_is_refused_at_class_creation():
    with pytest.raises(TypeError, match="OrganizationScopedAPIView"):

        class Escaped(OrganizationScopedMixin, generics.GenericAPIView):
            required_scopes = {"get": "jobs:read"}


@pytest.mark.parametrize(
    "permission_classes",
    [[permissions.IsAuthenticated], [IsUserSession, HasOrganizationScope], []],
    ids=["replaced", "not first", "none"],
)
def test_permissions_that_skip_resolving_the_organization_are_refused(permission_classes):
    with pytest.raises(TypeError, match="HasOrganizationScope"):
        type("Escaped", (OrganizationScopedAPIView,), {"permission_classes": permission_classes})


@pytest.mark.parametrize(
    "method",
    [
        "get_queryset",
        "filter_queryset",
        "get_object",
        "initial",
        "get_permissions",
        "check_permissions",
        "resolve_organization",
    ],
)
@pytest.mark.parametrize("base", [JobViewSet, OrganizationScopedAPIView])
def test_api_views_cannot_override_the_sealed_methods(base, method):
    with pytest.raises(TypeError, match=method):
        type("Escaped", (base,), {method: lambda self, *args, **kwargs: None})


@pytest.mark.parametrize("base", [JobViewSet, OrganizationScopedAPIView])
def test_api_views_cannot_name_a_queryset_of_their_own(base):
    with pytest.raises(TypeError, match="queryset"):
        type("Escaped", (base,), {"queryset": Job.objects.all()})


@pytest.mark.parametrize(
    "method", ["dispatch", "get_org_object", "get_org_queryset", "get_queryset", "get_object"]
)
def test_pages_cannot_override_the_sealed_methods(method):
    with pytest.raises(TypeError, match=method):
        type("Escaped", (OrganizationPageMixin, View), {method: lambda self, *a, **k: None})


def test_pages_cannot_name_a_queryset_of_their_own():
    with pytest.raises(TypeError, match="queryset"):
        type("Escaped", (OrganizationPageMixin, View), {"queryset": Job.objects.all()})
