"""A tenant hammers the API: per key, per user and per organization buckets answer 429 with
Retry-After, stricter on job submission, uploads, predictions and invitations. Behind the
production proxy the client address is the real one, for the failed-login limit and the audit log,
and a client cannot choose its own address where no proxy is trusted.

Rates are overridden to small numbers per test; nothing waits for a window to pass.
"""

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from jobs.models import Job, JobState
from tenants.actors import Actor
from tenants.api import throttles
from tenants.models import AuditEvent, Membership
from tenants.scopes import ROLE_SCOPES, Role
from tenants.services import api_key_create
from tenants.standing import Effect
from tests.factories import (
    DatasetVersionFactory,
    JobFactory,
    MembershipFactory,
    OrganizationFactory,
    UserFactory,
)
from tests.registry.conftest import local_store  # noqa: F401  a fixture used below
from tests.security.test_standing import EXPECTED_EFFECTS
from tests.test_tenancy_sweep import (
    CALLS,
    ROUTES_VIA,
    _send,
    world,  # noqa: F401  the sweep's fixture, used below
)

pytestmark = pytest.mark.django_db


# Thirty seconds into a minute (and an hour, and a day): the buckets' windows are fixed, and a
# test whose requests crossed a window's end would see the count start again halfway through.
PINNED_NOW = 86_400 * 20_834 + 30


@pytest.fixture
def rates(settings, monkeypatch):
    """Set some buckets' rates (e.g. submit="3/min"); the others stay as the test settings have
    them (high). The throttle's clock stands still for the test."""
    monkeypatch.setattr(throttles, "clock", lambda: PINNED_NOW)

    def apply(**overrides):
        settings.API_RATE_LIMITS = {**getattr(settings, "API_RATE_LIMITS", {}), **overrides}

    return apply


@pytest.fixture
def proxies(settings):
    """How many proxies in front of the web process append to X-Forwarded-For: the one setting
    that the failed-login limit, the API's buckets and the audit log all read."""

    def apply(count):
        settings.TRUSTED_PROXY_COUNT = count

    return apply


def key_client(user, organization, role=Role.OWNER):
    _key, token = api_key_create(
        organization=organization,
        name="ci",
        scopes=sorted(ROLE_SCOPES[role]),
        actor=Actor(user=user),
    )
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def session_client(user):
    client = APIClient()
    client.force_login(user)
    return client


def _jobs(org):
    return f"/api/v1/orgs/{org.slug}/jobs/"


def _submit_body(version):
    return {
        "recipe": "tabular-classifier",
        "parameters": {"target": "x"},
        "dataset": {"dataset": version.dataset.name, "number": version.number},
    }


def _assert_throttled(response, window_s=60):
    assert response.status_code == 429, response.content[:300]
    body = response.json()
    assert body["code"] == "throttled" and "seconds" in body["detail"]
    assert 1 <= int(response["Retry-After"]) <= window_s


def test_a_key_hammering_job_submission_gets_429_with_retry_after(org, owner, rates):
    rates(submit="3/min")
    version = DatasetVersionFactory(organization=org)
    client = key_client(owner, org)
    answers = [
        client.post(_jobs(org), _submit_body(version), format="json").status_code for _ in range(3)
    ]
    assert answers == [201, 201, 201]
    _assert_throttled(client.post(_jobs(org), _submit_body(version), format="json"))
    assert Job.objects.count() == 3
    # Reading is another, looser bucket: the key may still look at its jobs.
    assert client.get(_jobs(org)).status_code == 200


def test_two_keys_of_one_organization_share_its_bucket(org, owner, member_factory, rates):
    rates(org="4/min")
    first = key_client(owner, org)
    second = key_client(member_factory(org, "developer"), org, Role.DEVELOPER)
    assert [first.get(_jobs(org)).status_code for _ in range(2)] == [200, 200]
    assert [second.get(_jobs(org)).status_code for _ in range(2)] == [200, 200]
    _assert_throttled(second.get(_jobs(org)))
    _assert_throttled(first.get(_jobs(org)))
    other = OrganizationFactory()
    stranger = key_client(MembershipFactory(organization=other, role=Role.OWNER).user, other)
    assert stranger.get(_jobs(other)).status_code == 200


def test_each_key_has_its_own_bucket(org, owner, rates):
    rates(key="2/min")
    first, second = key_client(owner, org), key_client(owner, org)
    assert [first.get(_jobs(org)).status_code for _ in range(2)] == [200, 200]
    _assert_throttled(first.get(_jobs(org)))
    assert second.get(_jobs(org)).status_code == 200


def test_a_user_has_one_bucket_for_their_session_and_their_keys(org, owner, member_factory, rates):
    rates(user="3/min")
    session, key = session_client(owner), key_client(owner, org)
    assert [session.get(_jobs(org)).status_code for _ in range(2)] == [200, 200]
    assert key.get(_jobs(org)).status_code == 200
    _assert_throttled(key.get(_jobs(org)))
    _assert_throttled(session.get(_jobs(org)))
    colleague = session_client(member_factory(org, "developer"))
    assert colleague.get(_jobs(org)).status_code == 200


def _costly_calls(org):
    version = DatasetVersionFactory(organization=org)
    failed = JobFactory(organization=org, state="failed", input_dataset_version=version)
    dataset = version.dataset.name
    csv = b"a,b\n1,2\n"
    yield "submit", "post", "jobs/", _submit_body(version), "json"
    yield "submit", "post", f"jobs/{failed.pk}/retry/", None, "json"
    yield "submit", "post", "sweeps/", {"name": "s", "recipe": "tabular-classifier"}, "json"
    yield (
        "upload",
        "post",
        f"datasets/{dataset}/versions/",
        {"file": SimpleUploadedFile("a.csv", csv)},
        "multipart",
    )
    yield "upload", "post", f"datasets/{dataset}/uploads/", {"filename": "a.csv"}, "json"
    yield "upload", "post", "models/m/versions/", {"config": "{}"}, "multipart"
    yield "predict", "post", "deployments/d/predict/", {"inputs": [{"a": 1}]}, "json"
    yield "invite", "post", "invitations/", {"email": "x@example.test", "role": "viewer"}, "json"


def test_costly_operations_have_their_own_stricter_bucket(org, owner, rates, local_store):  # noqa: F811
    rates(submit="1/hour", upload="1/hour", predict="1/hour", invite="1/hour")
    client = key_client(owner, org)
    calls = list(_costly_calls(org))
    seen = set()
    for operation, method, path, body, fmt in calls:
        url = f"/api/v1/orgs/{org.slug}/{path}"
        response = getattr(client, method)(url, body, format=fmt)
        if operation in seen:
            _assert_throttled(response, window_s=3600)
        else:
            assert response.status_code != 429, (operation, path)
            seen.add(operation)
    # The rest of the API is not held back by the costly buckets.
    assert client.get(_jobs(org)).status_code == 200


def test_the_dashboards_submit_form_shares_the_submit_bucket(org, owner, rates):
    rates(submit="1/hour")
    version = DatasetVersionFactory(organization=org)
    key = key_client(owner, org)
    assert key.post(_jobs(org), _submit_body(version), format="json").status_code == 201
    page = Client()
    page.force_login(owner)
    response = page.post(
        reverse("jobs:job_submit", args=[org.slug]) + "?recipe=tabular-classifier",
        {
            "dataset_version": version.pk,
            "resource_class": "cpu",
            "gpu_count": 1,
            "priority": 0,
            "max_runtime_s": 600,
            "param_target": "x",
        },
    )
    assert response.status_code == 429 and int(response["Retry-After"]) >= 1
    assert Job.objects.count() == 1


# Client addresses behind the proxy


def _fail_login(xff: str, email: str):
    return Client(REMOTE_ADDR="10.0.0.1").post(
        reverse("account_login"),
        {"login": email, "password": "not-the-password"},
        HTTP_X_FORWARDED_FOR=xff,
    )


def _refused_for_too_many(response) -> bool:
    return "Too many failed login attempts" in response.content.decode()


@pytest.fixture
def login_limit(settings):
    # Per address only: the per-account part would mix the buckets under test.
    settings.ACCOUNT_RATE_LIMITS = {"login_failed": "2/m/ip"}


def test_behind_one_proxy_each_client_has_its_own_failed_login_bucket(proxies, login_limit):
    proxies(1)
    victim, attacker = UserFactory(), UserFactory()
    for _ in range(2):
        assert not _refused_for_too_many(_fail_login("203.0.113.9", attacker.email))
    assert _refused_for_too_many(_fail_login("203.0.113.9", attacker.email))
    # Someone else behind the same proxy still gets the ordinary answer.
    assert not _refused_for_too_many(_fail_login("198.51.100.4", victim.email))
    # The proxy appends the address it saw; what the client wrote before it is not trusted.
    assert _refused_for_too_many(_fail_login("198.51.100.4, 203.0.113.9", victim.email))


def test_without_a_trusted_proxy_a_forged_forwarded_for_is_ignored(proxies, login_limit):
    proxies(0)
    first, second = UserFactory(), UserFactory()
    for _ in range(2):
        _fail_login("203.0.113.9", first.email)
    assert _refused_for_too_many(_fail_login("198.51.100.4", second.email))


def _create_dataset(org, owner, **headers):
    client = session_client(owner)
    response = client.post(
        f"/api/v1/orgs/{org.slug}/datasets/",
        {"name": "audited"},
        format="json",
        REMOTE_ADDR="10.0.0.1",
        **headers,
    )
    assert response.status_code == 201, response.content
    return AuditEvent.objects.get(organization=org, action="dataset.create").ip


def test_the_audit_log_records_the_client_address_behind_the_proxy(org, owner, proxies):
    proxies(1)
    assert (
        _create_dataset(org, owner, HTTP_X_FORWARDED_FOR="6.6.6.6, 198.51.100.7") == "198.51.100.7"
    )


def test_the_audit_log_ignores_forwarded_for_without_a_trusted_proxy(org, owner, proxies):
    proxies(0)
    assert _create_dataset(org, owner, HTTP_X_FORWARDED_FOR="198.51.100.7") == "10.0.0.1"


def test_anonymous_callers_are_bucketed_by_their_real_address(proxies, rates):
    """The schema is public and costly to build: an anonymous caller has a bucket per address."""
    proxies(1)
    rates(anon="1/min")
    url = "/api/v1/schema/"
    assert APIClient().get(url, HTTP_X_FORWARDED_FOR="203.0.113.9").status_code == 200
    throttled = APIClient().get(url, HTTP_X_FORWARDED_FOR="203.0.113.9")
    assert throttled.status_code == 429 and 1 <= int(throttled["Retry-After"]) <= 60
    assert APIClient().get(url, HTTP_X_FORWARDED_FOR="198.51.100.4").status_code == 200


def test_parallel_requests_cannot_slip_past_a_full_bucket(org, rates):
    """Twenty requests at once against a bucket of five: exactly five pass (counted atomically,
    not read-then-written)."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier
    from types import SimpleNamespace

    from django.db import connections

    from tenants.api.throttles import RateLimit

    rates(org="5/hour")
    view = SimpleNamespace(organization=org)
    start = Barrier(20)

    def attempt(n):
        # Twenty people of one organization, each well within their own bucket.
        person = SimpleNamespace(is_authenticated=True, pk=10_000 + n)
        request = SimpleNamespace(method="GET", user=person, auth=None)
        start.wait()
        try:
            return RateLimit().allow_request(request, view)
        finally:
            connections.close_all()

    with ThreadPoolExecutor(20) as pool:
        allowed = list(pool.map(attempt, range(20)))
    assert allowed.count(True) == 5


# A leaked key cannot lock the organization out


def _org_detail(org):
    return f"/api/v1/orgs/{org.slug}/"


def _hammer(client, url, times):
    return [client.get(url).status_code for _ in range(times)]


def test_a_key_hammering_past_its_own_bucket_uses_up_nobody_elses(
    org, owner, member_factory, rates
):
    """A leaked key with only `org:read`, sent far past its own bucket: what it was refused is
    counted neither in its creator's bucket nor in the organization's."""
    rates(key="3/min", user="5/min", org="6/min")
    creator = member_factory(org, "developer")
    leaked = key_client(creator, org, Role.VIEWER)
    answers = _hammer(leaked, _org_detail(org), 40)
    assert answers == [200] * 3 + [429] * 37
    # Its creator still has 5 - 3 requests of their own, the organization 6 - 3.
    creator_session = session_client(creator)
    assert _hammer(creator_session, _org_detail(org), 2) == [200, 200]
    _assert_throttled(creator_session.get(_org_detail(org)))
    colleague = session_client(member_factory(org, "developer"))
    assert _hammer(colleague, _org_detail(org), 1) == [200]
    _assert_throttled(colleague.get(_org_detail(org)))


def test_a_request_refused_by_the_organizations_bucket_leaves_the_callers_untouched(
    org, owner, member_factory, rates
):
    """The first full bucket answers, and the buckets before it get their count back: requests
    refused in one organization do not use up the caller's own bucket for another."""
    rates(user="2/min", org="2/min")
    assert _hammer(session_client(owner), _org_detail(org), 2) == [200, 200]
    person = member_factory(org, "developer")
    elsewhere = OrganizationFactory()
    MembershipFactory(organization=elsewhere, user=person, role=Role.DEVELOPER)
    client = session_client(person)
    for _ in range(10):
        _assert_throttled(client.get(_org_detail(org)))
    assert _hammer(client, _org_detail(elsewhere), 2) == [200, 200]


def _fill_the_organizations_bucket(org, member_factory, rates):
    rates(org="2/min")
    flooder = key_client(member_factory(org, "viewer"), org, Role.VIEWER)
    assert _hammer(flooder, _org_detail(org), 2) == [200, 200]
    _assert_throttled(flooder.get(_org_detail(org)))
    _assert_throttled(session_client(member_factory(org, "developer")).get(_jobs(org)))


def test_while_a_leaked_key_fills_the_organizations_bucket_the_owner_can_still_shut_it_out(
    org, owner, member_factory, rates
):
    rates(org="3/min")
    creator = member_factory(org, "developer")
    leaked_key, token = api_key_create(
        organization=org, name="leaked", scopes=["org:read"], actor=Actor(user=creator)
    )
    second_key, _ = api_key_create(
        organization=org, name="leaked too", scopes=["org:read"], actor=Actor(user=creator)
    )
    leaked = APIClient()
    leaked.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    assert _hammer(leaked, _org_detail(org), 3) == [200, 200, 200]
    for _ in range(5):
        _assert_throttled(leaked.get(_org_detail(org)))
    api = session_client(owner)
    _assert_throttled(api.get(_jobs(org)))

    revoked = api.delete(f"/api/v1/orgs/{org.slug}/api-keys/{leaked_key.pk}/")
    assert revoked.status_code == 204, revoked.content[:300]
    assert leaked.get(_org_detail(org)).status_code == 401
    page = Client()
    page.force_login(owner)
    response = page.post(reverse("tenants:api_key_revoke", args=[org.slug, second_key.pk]))
    assert response.status_code == 302, response.content[:300]
    second_key.refresh_from_db()
    assert second_key.revoked_at is not None

    by_api, by_page = JobFactory(organization=org), JobFactory(organization=org)
    cancelled = api.post(f"/api/v1/orgs/{org.slug}/jobs/{by_api.pk}/cancel/", format="json")
    assert cancelled.status_code == 200, cancelled.content[:300]
    response = page.post(reverse("jobs:job_cancel", args=[org.slug, by_page.pk]))
    assert response.status_code == 302, response.content[:300]
    assert set(
        Job.objects.filter(pk__in=[by_api.pk, by_page.pk]).values_list("state", flat=True)
    ) <= {JobState.CANCELLING, JobState.CANCELLED}
    # Everything else still waits for the organization's window to pass.
    _assert_throttled(api.get(_jobs(org)))


WAY_OUT_ROUTES = [
    (route, via)
    for route, via in ROUTES_VIA
    if EXPECTED_EFFECTS.get(str(route)) in (Effect.REDUCE, Effect.PAY)
]


@pytest.mark.parametrize(("route", "via"), WAY_OUT_ROUTES, ids=lambda v: str(v))
def test_every_way_out_works_while_the_organizations_bucket_is_full(
    route,
    via,
    org,
    owner,
    member_factory,
    rates,
    world,  # noqa: F811
):
    """Cancelling, deleting, revoking, removing and paying: each still runs for the owner, by
    session or key, while others have used up the organization's bucket."""
    _fill_the_organizations_bucket(org, member_factory, rates)
    case, url = world(route, org, requester=owner)
    client = session_client(owner) if via == "session" else key_client(owner, org)
    response = _send(client, route, url, case)
    call = CALLS[str(route)]
    assert response.status_code == call.status, (str(route), response.content[:300])
    assert call.wrote(case), str(route)


def test_the_way_outs_are_found():
    assert {
        "DELETE api-key-detail",
        "POST tenants:api_key_revoke",
        "POST job-cancel",
        "POST jobs:job_cancel",
        "DELETE member-detail",
        "PATCH billing-account",
        "POST billing-checkout",
        "POST billing:billing",
    } <= {str(route) for route, _via in WAY_OUT_ROUTES}


# Each organization costs money up front: a person makes only so many a day


def _organizations_of(user):
    return Membership.objects.filter(user=user).count()


def _create_by_api(user, n):
    return session_client(user).post("/api/v1/orgs/", {"name": f"Shell {n}"}, format="json")


def _create_by_page(user, n):
    page = Client()
    page.force_login(user)
    return page.post(reverse("tenants:organization_create"), {"name": f"Shell {n}"})


def test_the_eleventh_organization_of_a_day_is_refused_through_the_api(user, rates):
    rates(org_create="10/day")
    assert [_create_by_api(user, n).status_code for n in range(10)] == [201] * 10
    _assert_throttled(_create_by_api(user, 10), window_s=86400)
    assert _organizations_of(user) == 10
    # Another person has their own allowance.
    assert _create_by_api(UserFactory(), 0).status_code == 201


def test_the_eleventh_organization_of_a_day_is_refused_on_the_dashboard(user, rates):
    rates(org_create="10/day")
    assert [_create_by_page(user, n).status_code for n in range(10)] == [302] * 10
    refused = _create_by_page(user, 10)
    assert refused.status_code == 429
    assert 1 <= int(refused["Retry-After"]) <= 86400
    assert "Too many requests" in refused.content.decode()
    assert _organizations_of(user) == 10


def test_the_api_and_the_dashboard_share_the_daily_allowance(user, rates):
    rates(org_create="4/day")
    assert [_create_by_api(user, n).status_code for n in range(2)] == [201, 201]
    assert [_create_by_page(user, n).status_code for n in range(2, 4)] == [302, 302]
    _assert_throttled(_create_by_api(user, 4), window_s=86400)
    assert _create_by_page(user, 5).status_code == 429
    assert _organizations_of(user) == 4
    assert AuditEvent.objects.filter(action="organization.create").count() == 4


@pytest.mark.parametrize("backend", ["redis", "locmem"])
def test_buckets_are_taken_all_or_none_on_redis_and_on_any_other_cache(backend, settings):
    """The same rule on both paths (one script on Redis, the cache API elsewhere): a request
    counts in every bucket or in none, and the full bucket's window end is the wait."""
    from django.core.cache import cache

    if backend == "locmem":
        settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    settings.API_RATE_LIMITS = {"key": "100/min", "org": "2/min", "predict": "100/hour"}
    buckets = [
        throttles.Bucket("key", "k1"),
        throttles.Bucket("org", "o1"),
        throttles.Bucket("predict", "org:o1"),
    ]
    minute, hour = PINNED_NOW // 60, PINNED_NOW // 3600
    counts = lambda: (  # noqa: E731
        cache.get(f"throttle:key:k1:{minute}"),
        cache.get(f"throttle:org:o1:{minute}"),
        cache.get(f"throttle:predict:org:o1:{hour}"),
    )
    assert throttles.buckets_take(buckets, now=PINNED_NOW) is None
    assert throttles.buckets_take(buckets, now=PINNED_NOW) is None
    assert counts() == (2, 2, 2)
    assert throttles.buckets_take(buckets, now=PINNED_NOW) == 30  # the org's minute ends in 30 s
    assert counts() == (2, 2, 2)  # the key's count given back, the predict bucket never reached
    # Another key of the organization is refused by the organization's bucket alone.
    assert throttles.buckets_take([throttles.Bucket("key", "k2"), buckets[1]], now=PINNED_NOW)
    assert cache.get(f"throttle:key:k2:{minute}") == 0
    if backend == "redis":
        from tenants.cache_client import redis_client

        client, redis_backend = redis_client()
        ttl = client.ttl(redis_backend.make_and_validate_key(f"throttle:predict:org:o1:{hour}"))
        assert 0 < ttl <= 3601  # every key expires with its window
