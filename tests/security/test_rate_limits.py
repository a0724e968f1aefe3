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

from jobs.models import Job
from tenants.actors import Actor
from tenants.models import AuditEvent
from tenants.scopes import ROLE_SCOPES, Role
from tenants.services import api_key_create
from tests.factories import (
    DatasetVersionFactory,
    JobFactory,
    MembershipFactory,
    OrganizationFactory,
    UserFactory,
)
from tests.registry.conftest import local_store  # noqa: F401  a fixture used below

pytestmark = pytest.mark.django_db


@pytest.fixture
def rates(settings):
    """Set some buckets' rates (e.g. submit="3/min"); the others stay as the test settings have
    them (high)."""

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
    yield "predict", "post", "models/m/predict/", {"rows": [{"a": 1}]}, "json"
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

    from tenants.api.throttles import OrganizationThrottle

    rates(org="5/hour")
    view = SimpleNamespace(organization=org)
    request = SimpleNamespace(method="GET")
    start = Barrier(20)

    def attempt(_):
        start.wait()
        try:
            return OrganizationThrottle().allow_request(request, view)
        finally:
            connections.close_all()

    with ThreadPoolExecutor(20) as pool:
        allowed = list(pool.map(attempt, range(20)))
    assert allowed.count(True) == 5
