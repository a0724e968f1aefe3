"""The cross-tenant sweep: every org-scoped route, every method, every role.

Routes are found by walking the URL patterns, so a new route is swept without being listed here.
A route without a declared scope, or about an object kind this sweep cannot create, fails.
"""

import re
import secrets
from dataclasses import dataclass
from datetime import timedelta

import pytest
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from django.utils import timezone
from rest_framework.test import APIClient

from billing.models import Invoice
from jobs.models import Job, Sweep
from registry.models import (
    Dataset,
    DatasetVersion,
    ModelAlias,
    ModelVersion,
    PendingUpload,
    RegisteredModel,
)
from tenants.api.base import OrganizationScopedMixin
from tenants.models import ApiKey, Invitation, Membership
from tenants.scopes import ROLE_SCOPES, Role
from tenants.selectors import hash_secret
from tenants.views.base import OrganizationPageMixin
from tests.factories import (
    DatasetVersionFactory,
    JobFactory,
    MembershipFactory,
    ModelAliasFactory,
    OrganizationFactory,
    PendingUploadFactory,
)

API_PREFIX = "api/v1/orgs/<slug:org_slug>/"
PAGE_PREFIX = "o/<slug:org_slug>/"
SKIPPED_METHODS = {"options", "head", "trace"}


@dataclass(frozen=True)
class Route:
    kind: str  # "api" or "page"
    name: str
    view_class: type
    method: str
    action: str
    kwargs: tuple[str, ...]  # URL parameters besides org_slug

    def __str__(self):
        return f"{self.method.upper()} {self.name}"

    @property
    def scope(self):
        return self.view_class.required_scopes.get(self.action)


def _walk(patterns, prefix="", namespace=None):
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            ns = ":".join(filter(None, [namespace, pattern.namespace])) or None
            yield from _walk(pattern.url_patterns, prefix + str(pattern.pattern), ns)
        elif isinstance(pattern, URLPattern):
            name = f"{namespace}:{pattern.name}" if namespace else pattern.name
            yield prefix + str(pattern.pattern), name, pattern.callback


def _routes():
    routes = []
    for path, name, callback in _walk(get_resolver().url_patterns):
        kind = (
            "api"
            if path.startswith(API_PREFIX)
            else "page"
            if path.startswith(PAGE_PREFIX)
            else None
        )
        if kind is None:
            continue
        view_class = getattr(callback, "cls", None) or callback.view_class
        kwargs = tuple(
            k for k in re.findall(r"<(?:\w+:)?(\w+)>|\(\?P<(\w+)>", path) for k in k if k
        )
        kwargs = tuple(k for k in kwargs if k != "org_slug")
        if getattr(callback, "actions", None):
            method_actions = dict(callback.actions)
        elif kind == "api":
            method_actions = {
                m: m
                for m in view_class.http_method_names
                if m not in SKIPPED_METHODS and hasattr(view_class, m)
            }
        else:
            method_actions = {m: m for m in getattr(view_class, "required_scopes", {})}
        routes += [
            Route(kind, name, view_class, method, action, kwargs)
            for method, action in method_actions.items()
            if method not in SKIPPED_METHODS and method in view_class.http_method_names
        ]
    return routes


ROUTES = _routes()
# Pages take sessions only; the API takes sessions and keys.
ROUTES_VIA = [
    (route, via)
    for route in ROUTES
    for via in ("session", "key")
    if route.kind == "api" or via == "session"
]


def _make_membership(organization, requester):
    return {"pk": MembershipFactory(organization=organization, role=Role.DEVELOPER).pk}


def _make_invitation(organization, requester):
    invitation = Invitation.objects.create(
        organization=organization,
        email=f"{secrets.token_hex(4)}@invited.test",
        role=Role.VIEWER,
        token_hash=hash_secret(secrets.token_hex(16)),
        expires_at=timezone.now() + timedelta(days=7),
    )
    return {"pk": invitation.pk}


def _make_api_key(organization, requester):
    creator = requester or MembershipFactory(organization=organization).user
    key = ApiKey.objects.create(
        organization=organization,
        name="swept",
        prefix="fsk" + secrets.token_hex(4),
        secret_hash=hash_secret(secrets.token_hex(16)),
        scopes=["org:read"],
        created_by=creator,
    )
    return {"pk": key.pk}


def _make_dataset_version(organization, requester):
    version = DatasetVersionFactory(organization=organization)
    upload = PendingUploadFactory(organization=organization, dataset=version.dataset)
    name = version.dataset.name
    return {"name": name, "dataset_name": name, "number": version.number, "pk": upload.pk}


def _make_model_version(organization, requester):
    alias = ModelAliasFactory(organization=organization)
    name = alias.registered_model.name
    return {"name": name, "model_name": name, "number": alias.version.number, "alias": alias.name}


def _make_job(organization, requester):
    return {"pk": JobFactory(organization=organization).pk}


def _make_sweep(organization, requester):
    sweep = Sweep.objects.create(
        organization=organization,
        name="swept",
        recipe="tabular-classifier",
        space={"epochs": {"values": [1, 2]}},
        trial_count=2,
        metric="val_accuracy",
    )
    return {"pk": sweep.pk}


def _make_invoice(organization, requester):
    start = timezone.now().replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    invoice = Invoice.objects.create(
        organization=organization,
        number=f"SWEPT-{secrets.token_hex(4)}",
        source=Invoice.Source.BUILTIN,
        status=Invoice.Status.OPEN,
        period_start=start,
        period_end=start + timedelta(days=28),
        subtotal_minor=100,
        total_minor=100,
    )
    invoice.lines.create(
        description="Storage", resource="storage", unit="gb_month", amount_minor=100
    )
    return {"pk": invoice.pk}


# One maker per kind of object a route is about: (organization, requesting user) -> URL kwargs.
# A maker may return more kwargs than a route needs; each route takes the ones it names.
OBJECT_MAKERS = {
    Membership: _make_membership,
    Invitation: _make_invitation,
    ApiKey: _make_api_key,
    Dataset: _make_dataset_version,
    DatasetVersion: _make_dataset_version,
    PendingUpload: _make_dataset_version,
    RegisteredModel: _make_model_version,
    ModelVersion: _make_model_version,
    ModelAlias: _make_model_version,
    Job: _make_job,
    Sweep: _make_sweep,
    Invoice: _make_invoice,
}


def _url(route, organization, requester=None, object_org=None):
    kwargs = {"org_slug": organization.slug}
    if route.kwargs:
        made = OBJECT_MAKERS[route.view_class.model](object_org or organization, requester)
        kwargs |= {name: made[name] for name in route.kwargs}
    return reverse(route.name, kwargs=kwargs)


def _request(client, route, url):
    call = getattr(client, route.method)
    if route.kind == "api" and route.method in {"post", "put", "patch"}:
        return call(url, {}, format="json")
    return call(url)


def _session_client(user):
    client = APIClient()
    client.force_login(user)
    return client


def _key_client(user, organization, scopes):
    from tenants.actors import Actor
    from tenants.services import api_key_create

    _key, token = api_key_create(
        organization=organization, name="sweep", scopes=sorted(scopes), actor=Actor(user=user)
    )
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def test_sweep_finds_the_org_scoped_routes():
    names = {route.name for route in ROUTES}
    assert {"member-list", "api-key-detail", "organization-detail", "tenants:members"} <= names


@pytest.mark.parametrize("route", ROUTES, ids=str)
def test_route_is_built_on_the_org_scoped_base_and_declares_its_scope(route):
    base = OrganizationScopedMixin if route.kind == "api" else OrganizationPageMixin
    assert issubclass(route.view_class, base), f"{route} does not use the org-scoped base"
    assert route.scope is not None, f"{route} declares no scope for {route.action!r}"
    if route.kwargs:
        assert route.view_class.model in OBJECT_MAKERS, f"no sweep object maker for {route}"


@pytest.mark.django_db
@pytest.mark.parametrize("route", ROUTES, ids=str)
def test_no_credentials_is_refused(route):
    org = OrganizationFactory()
    response = _request(APIClient(), route, _url(route, org))
    if route.kind == "api":
        assert response.status_code == 401
    else:
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("account_login"))


@pytest.mark.django_db
@pytest.mark.parametrize(("route", "via"), ROUTES_VIA, ids=str)
def test_member_of_another_organization_gets_404(route, via):
    org, outsider_org = OrganizationFactory(), OrganizationFactory()
    outsider = MembershipFactory(organization=outsider_org, role=Role.OWNER).user
    client = (
        _session_client(outsider)
        if via == "session"
        else _key_client(outsider, outsider_org, ROLE_SCOPES[Role.OWNER])
    )
    assert _request(client, route, _url(route, org)).status_code == 404


@pytest.mark.django_db
@pytest.mark.parametrize("route", [r for r in ROUTES if r.kwargs], ids=str)
def test_object_of_another_organization_is_404_through_ones_own_slug(route):
    org, other = OrganizationFactory(), OrganizationFactory()
    owner = MembershipFactory(organization=org, role=Role.OWNER).user
    url = _url(route, org, requester=owner, object_org=other)
    assert _request(_session_client(owner), route, url).status_code == 404


@pytest.mark.django_db
@pytest.mark.parametrize("role", Role.values)
@pytest.mark.parametrize(("route", "via"), ROUTES_VIA, ids=str)
def test_each_role_is_allowed_or_403_as_the_scope_table_says(route, via, role):
    org = OrganizationFactory()
    MembershipFactory(organization=org, role=Role.OWNER)  # never the last owner under test
    user = MembershipFactory(organization=org, role=role).user
    client = (
        _session_client(user) if via == "session" else _key_client(user, org, ROLE_SCOPES[role])
    )
    response = _request(client, route, _url(route, org, requester=user))
    key_refused = via == "key" and route.action in getattr(
        route.view_class, "session_only_actions", ()
    )
    if route.scope in ROLE_SCOPES[role] and not key_refused:
        assert response.status_code not in {401, 403, 404, 405}, response.content[:300]
        assert response.status_code < 500
    else:
        assert response.status_code == 403


@pytest.mark.django_db
@pytest.mark.parametrize("route", [r for r in ROUTES if r.kind == "api"], ids=str)
def test_key_without_the_scope_is_403_even_if_its_creator_has_it(route):
    org = OrganizationFactory()
    owner = MembershipFactory(organization=org, role=Role.OWNER).user
    narrow = {"org:read"} if route.scope != "org:read" else {"members:read"}
    response = _request(_key_client(owner, org, narrow), route, _url(route, org, requester=owner))
    assert response.status_code == 403
