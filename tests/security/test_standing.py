"""A tenant that may not spend tries anyway: suspended, past due after the grace period, or over a
hard-capped budget, it submits, retries, sweeps, uploads, registers and predicts through the API
and the dashboard's forms. Each spend is refused with a clear error and leaves nothing behind;
reading, cancelling, deleting and paying still work, so the tenant can see and fix its standing.
"""

from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from billing.models import BillingAccount, UsageRecord
from billing.services import billing_account_ensure, budget_set, usage_record
from billing.stripe_events import past_due_set
from jobs.models import Job, JobState, Sweep
from registry.models import Dataset, DatasetVersion, ModelVersion, PendingUpload
from serving.models import Deployment
from tenants.actors import Actor
from tenants.models import ApiKey, Invitation, Membership, Organization
from tenants.scopes import Role
from tenants.standing import Effect, action_effect
from tests.billing.conftest import fake_stripe, stripe_server  # noqa: F401  fixtures used below
from tests.factories import (
    DatasetVersionFactory,
    JobFactory,
    MembershipFactory,
    OrganizationFactory,
    UserFactory,
)
from tests.jobs.test_predict import EXIT_OK, run_child, write_tabular_sample
from tests.registry.conftest import local_store  # noqa: F401  a fixture used below
from tests.serving.replicas import FakeReplica, ready_replica
from tests.tenants.invitations import invite
from tests.test_tenancy_sweep import (
    CALLS,
    ROUTES,
    _send,
    world,  # noqa: F401  the sweep's fixture, used below
)

pytestmark = pytest.mark.django_db

CSV = b"age,city,score\n31,Paris,0.5\n45,Lyon,0.75\n"
ROW = {
    "age": 30,
    "monthly_spend": 20.5,
    "tenure_months": 3,
    "support_calls": 1,
    "plan": "basic",
    "region": "west",
}


def _suspend(org, owner):
    Organization.objects.filter(pk=org.pk).update(status=Organization.Status.SUSPENDED)


def _past_due(org, owner):
    account = billing_account_ensure(organization=org)
    past_due_set(account=account, since=timezone.now() - timedelta(days=8))


def _over_budget(org, owner):
    budget_set(
        organization=org,
        actor=Actor(user=owner),
        monthly_budget_minor=500,
        thresholds=[],
        hard_cap=True,
    )
    now = timezone.now()
    usage_record(
        organization=org,
        resource="gpu:a100-40gb",
        quantity=Decimal(500) / Decimal("0.08"),
        unit="gpu_second",
        period_start=now - timedelta(minutes=5),
        period_end=now,
        idempotency_key=f"spent:{org.pk}",
    )


@dataclass(frozen=True)
class Standing:
    name: str
    reach: object
    status: int
    code: str

    def __str__(self):
        return self.name


STANDINGS = [
    Standing("suspended", _suspend, 403, "organization_suspended"),
    Standing("past_due", _past_due, 402, "payment_past_due"),
    Standing("budget_reached", _over_budget, 402, "budget_reached"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tabular model the job child trained, small enough to serve online."""
    workdir = tmp_path_factory.mktemp("train")
    write_tabular_sample(workdir / "data.csv", rows=120, seed=0)
    run = run_child(workdir, parameters={"target": "label", "epochs": 1, "hidden_sizes": [8]})
    assert run.returncode == EXIT_OK, run.stderr
    return workdir / "out"


@dataclass
class Tenant:
    org: Organization
    owner: object
    version: DatasetVersion
    failed_job: Job
    queued_job: Job
    model: str
    deployment: str
    upload: int

    def api(self, path: str) -> str:
        return f"/api/v1/orgs/{self.org.slug}/{path}"

    def page(self, name: str, *args) -> str:
        return reverse(name, args=[self.org.slug, *args])


@pytest.fixture
def tenant(org, local_store, model_dir, client_for):  # noqa: F811
    """An organization in good standing with something of everything, made before it fell."""
    owner = MembershipFactory(organization=org, role=Role.OWNER).user
    version = DatasetVersionFactory(organization=org)
    session = client_for(owner)
    assert (
        session.post(
            f"/api/v1/orgs/{org.slug}/models/", {"name": "churn"}, format="json"
        ).status_code
        == 201
    )
    registered = session.post(
        f"/api/v1/orgs/{org.slug}/models/churn/versions/",
        {
            "weights": SimpleUploadedFile(
                "model.safetensors", (model_dir / "model.safetensors").read_bytes()
            ),
            "config": (model_dir / "config.json").read_text(),
            "recipe_name": "tabular-classifier",
        },
        format="multipart",
    )
    assert registered.status_code == 201, registered.content
    deployed = session.post(
        f"/api/v1/orgs/{org.slug}/deployments/",
        {
            "name": "churn",
            "recipe": "tabular-classifier",
            "routes": [
                {"model_version": ModelVersion.objects.get(organization=org).pk, "weight": 100}
            ],
        },
        format="json",
    )
    assert deployed.status_code == 201, deployed.content
    upload = session.post(
        f"/api/v1/orgs/{org.slug}/datasets/{version.dataset.name}/uploads/",
        {"filename": "big.csv", "size_bytes": len(CSV)},
        format="json",
    )
    assert upload.status_code == 201, upload.content
    return Tenant(
        org=org,
        owner=owner,
        version=version,
        failed_job=JobFactory(
            organization=org, state=JobState.FAILED, input_dataset_version=version
        ),
        queued_job=JobFactory(organization=org, input_dataset_version=version),
        model="churn",
        deployment="churn",
        upload=upload.json()["id"],
    )


def _spent(tenant) -> dict[str, int]:
    """Everything a spend would add, counted."""
    org = tenant.org
    return {
        "jobs": Job.objects.for_organization(org).count(),
        "sweeps": Sweep.objects.for_organization(org).count(),
        "dataset versions": DatasetVersion.objects.for_organization(org).count(),
        "pending uploads": PendingUpload.objects.for_organization(org).count(),
        "model versions": ModelVersion.objects.for_organization(org).count(),
        "predictions billed": UsageRecord.objects.filter(
            organization=org, resource="predictions"
        ).count(),
    }


def _api_spends(t: Tenant):
    dataset = {"dataset": t.version.dataset.name, "number": t.version.number}
    yield (
        "submit a job",
        "post",
        t.api("jobs/"),
        {
            "recipe": "tabular-classifier",
            "parameters": {"target": "x"},
            "dataset": dataset,
        },
        "json",
    )
    yield "retry a job", "post", t.api(f"jobs/{t.failed_job.pk}/retry/"), None, "json"
    yield (
        "start a sweep",
        "post",
        t.api("sweeps/"),
        {
            "name": "swept",
            "recipe": "tabular-classifier",
            "parameters": {"target": "x"},
            "space": {"epochs": {"values": [1, 2]}},
            "strategy": "grid",
            "trial_count": 2,
            "metric": "val_accuracy",
            "dataset": dataset,
        },
        "json",
    )
    yield (
        "upload a version",
        "post",
        t.api(f"datasets/{t.version.dataset.name}/versions/"),
        {"file": SimpleUploadedFile("more.csv", CSV)},
        "multipart",
    )
    yield (
        "start a large upload",
        "post",
        t.api(f"datasets/{t.version.dataset.name}/uploads/"),
        {
            "filename": "more.csv",
            "size_bytes": len(CSV),
        },
        "json",
    )
    yield (
        "finalize an upload",
        "post",
        t.api(f"datasets/{t.version.dataset.name}/uploads/{t.upload}/finalize/"),
        None,
        "json",
    )
    yield (
        "register a model version",
        "post",
        t.api(f"models/{t.model}/versions/"),
        {
            "weights": SimpleUploadedFile("model.safetensors", b"not checked before the standing"),
            "config": "{}",
        },
        "multipart",
    )
    yield (
        "predict online",
        "post",
        t.api(f"deployments/{t.deployment}/predict/"),
        {"inputs": [ROW] * 10},
        "json",
    )


@pytest.mark.parametrize("via", ["session", "key"])
@pytest.mark.parametrize("standing", STANDINGS, ids=str)
def test_an_organization_that_may_not_spend_cannot_spend_through_the_api(
    tenant, standing, via, client_for, key_client_for
):
    client = (
        client_for(tenant.owner) if via == "session" else key_client_for(tenant.owner, tenant.org)
    )
    before = _spent(tenant)
    standing.reach(tenant.org, tenant.owner)
    answers = {}
    for what, method, url, body, fmt in _api_spends(tenant):
        response = getattr(client, method)(url, body, format=fmt)
        answers[what] = (response.status_code, response.json().get("code"))
        assert response.status_code != standing.status or response.json()["detail"], what
    assert answers == {what: (standing.status, standing.code) for what in answers}
    assert _spent(tenant) == before


@pytest.mark.parametrize("standing", STANDINGS, ids=str)
def test_an_organization_that_may_not_spend_cannot_spend_through_the_dashboard(tenant, standing):
    client = Client()
    client.force_login(tenant.owner)
    before = _spent(tenant)
    standing.reach(tenant.org, tenant.owner)
    form = {
        "dataset_version": tenant.version.pk,
        "resource_class": "cpu",
        "gpu_count": 1,
        "priority": 0,
        "max_runtime_s": 600,
        "param_target": "x",
    }
    attempts = [
        (tenant.page("jobs:job_submit") + "?recipe=tabular-classifier", form),
        (tenant.page("jobs:job_retry", tenant.failed_job.pk), {}),
        (
            tenant.page("jobs:job_predict"),
            {
                "model_version": ModelVersion.objects.get(organization=tenant.org).pk,
                "dataset_version": tenant.version.pk,
                "resource_class": "cpu",
                "output_dataset": "scored",
            },
        ),
    ]
    answers = {url: client.post(url, data) for url, data in attempts}
    assert {url: r.status_code for url, r in answers.items()} == dict.fromkeys(
        answers, standing.status
    )
    for url, response in answers.items():  # each says why, and where to fix it
        assert reverse("billing:billing", args=[tenant.org.slug]) in response.content.decode(), url
    assert _spent(tenant) == before


def test_a_suspended_organization_cannot_hand_out_access_or_change_settings(
    tenant, client_for, key_client_for
):
    """Suspension is an operator's decision: besides spending, no new keys, members or names."""
    session = client_for(tenant.owner)
    key = key_client_for(tenant.owner, tenant.org)
    _suspend(tenant.org, tenant.owner)
    keys, invitations = ApiKey.objects.count(), Invitation.objects.count()
    attempts = [
        (session, "post", tenant.api("api-keys/"), {"name": "more", "scopes": ["jobs:write"]}),
        (key, "post", tenant.api("invitations/"), {"email": "a@out.test", "role": "owner"}),
        (session, "patch", tenant.api(""), {"name": "Renamed"}),
        (key, "post", tenant.api("datasets/"), {"name": "fresh"}),
    ]
    for client, method, url, body in attempts:
        response = getattr(client, method)(url, body, format="json")
        assert response.status_code == 403, (url, response.content[:300])
        assert response.json()["code"] == "organization_suspended"
    page = Client()
    page.force_login(tenant.owner)
    for url, data in [
        (tenant.page("tenants:api_keys"), {"name": "more", "scopes": ["jobs:write"]}),
        (tenant.page("tenants:members"), {"email": "b@out.test", "role": "viewer"}),
        (tenant.page("registry:datasets"), {"name": "fresh"}),
    ]:
        assert page.post(url, data).status_code == 403, url
    assert (ApiKey.objects.count(), Invitation.objects.count()) == (keys, invitations)
    assert not Dataset.objects.filter(name="fresh").exists()
    tenant.org.refresh_from_db()
    assert tenant.org.name != "Renamed"


def test_a_suspended_organization_takes_no_new_members(org, owner, client_for):
    """An invitation sent before the suspension is still in the invitee's mailbox: accepting it,
    through the API or the page, must not add a member to the suspended organization."""
    _invitation, token = invite(
        organization=org, email="late@example.test", role=Role.DEVELOPER, actor=Actor(user=owner)
    )
    joiner = UserFactory(email="late@example.test")
    _suspend(org, owner)
    response = client_for(joiner).post(
        "/api/v1/invitations/accept/", {"token": token}, format="json"
    )
    assert response.status_code == 403, response.content
    assert response.json()["code"] == "organization_suspended"
    page = Client()
    page.force_login(joiner)
    answered = page.post(reverse("tenants:invitation_accept"), {"token": token})
    assert answered.status_code == 403
    assert "suspended" in answered.content.decode()
    assert not Membership.objects.filter(organization=org, user=joiner).exists()
    # The same link works once the operator lifts the suspension.
    Organization.objects.filter(pk=org.pk).update(status=Organization.Status.ACTIVE)
    answered = page.post(reverse("tenants:invitation_accept"), {"token": token})
    assert answered.status_code == 302
    assert Membership.objects.filter(organization=org, user=joiner).exists()


@pytest.mark.parametrize("standing", STANDINGS[1:], ids=str)
def test_an_organization_that_owes_money_may_still_invite_someone_to_pay(
    tenant, standing, client_for
):
    standing.reach(tenant.org, tenant.owner)
    response = client_for(tenant.owner).post(
        tenant.api("invitations/"),
        {"email": "payer@example.test", "role": "billing"},
        format="json",
    )
    assert response.status_code == 201, response.content


@pytest.mark.parametrize("standing", STANDINGS, ids=str)
def test_reading_cancelling_and_deleting_still_work(tenant, standing, key_client_for):
    standing.reach(tenant.org, tenant.owner)
    client = key_client_for(tenant.owner, tenant.org)
    assert client.get(tenant.api("jobs/")).status_code == 200
    assert client.get(tenant.api(f"jobs/{tenant.queued_job.pk}/")).status_code == 200
    assert client.post(tenant.api("jobs/estimate/"), {}, format="json").status_code == 200
    cancelled = client.post(tenant.api(f"jobs/{tenant.queued_job.pk}/cancel/"))
    assert cancelled.status_code == 200, cancelled.content
    assert cancelled.json()["state"] == JobState.CANCELLED
    other = DatasetVersionFactory(organization=tenant.org)
    assert client.delete(tenant.api(f"datasets/{other.dataset.name}/")).status_code == 204
    revoked = ApiKey.objects.filter(organization=tenant.org).first()
    assert client.delete(tenant.api(f"api-keys/{revoked.pk}/")).status_code == 204

    page = Client()
    page.force_login(tenant.owner)
    overview = page.get(tenant.page("tenants:overview"))
    assert overview.status_code == 200
    job = JobFactory(organization=tenant.org, input_dataset_version=tenant.version)
    assert page.post(tenant.page("jobs:job_cancel", job.pk)).status_code == 302
    job.refresh_from_db()
    assert job.state == JobState.CANCELLED


@pytest.mark.parametrize("standing", STANDINGS, ids=str)
def test_every_page_shows_the_standing_in_a_banner(tenant, standing):
    page = Client()
    page.force_login(tenant.owner)
    assert 'role="alert"' not in page.get(tenant.page("jobs:jobs")).content.decode()
    standing.reach(tenant.org, tenant.owner)
    html = page.get(tenant.page("jobs:jobs")).content.decode()
    assert 'role="alert"' in html and reverse("billing:billing", args=[tenant.org.slug]) in html


@pytest.mark.parametrize("standing", STANDINGS, ids=str)
def test_paying_still_works(tenant, standing, fake_stripe, client_for):  # noqa: F811
    standing.reach(tenant.org, tenant.owner)
    client = client_for(tenant.owner)
    checkout = client.post(tenant.api("billing/checkout/"), {}, format="json")
    assert checkout.status_code == 200, checkout.content
    assert checkout.json()["url"].startswith("https://checkout.stripe.test/")
    portal = client.post(tenant.api("billing/portal/"), {}, format="json")
    assert portal.status_code == 200, portal.content
    page = Client()
    page.force_login(tenant.owner)
    assert page.get(tenant.page("billing:billing")).status_code == 200
    assert page.post(tenant.page("billing:checkout")).status_code == 302


@pytest.fixture
def answering(tenant):
    """A ready replica (a real HTTP server keeping the contract) behind the tenant's deployment."""
    deployment = Deployment.objects.get(organization=tenant.org, name=tenant.deployment)
    fake = FakeReplica("standing").start()
    ready_replica(deployment, ModelVersion.objects.get(organization=tenant.org), fake)
    yield fake
    fake.stop()


def test_raising_a_reached_budget_lets_the_tenant_spend_again(tenant, answering, key_client_for):
    _over_budget(tenant.org, tenant.owner)
    client = key_client_for(tenant.owner, tenant.org)
    body = {"inputs": [ROW]}
    url = tenant.api(f"deployments/{tenant.deployment}/predict/")
    refused = client.post(url, body, format="json")
    assert refused.status_code == 402
    raised = client.patch(
        tenant.api("billing/account/"), {"monthly_budget_minor": 100_000}, format="json"
    )
    assert raised.status_code == 200, raised.content
    assert BillingAccount.objects.get(organization=tenant.org).monthly_budget_minor == 100_000
    answered = client.post(url, body, format="json")
    assert answered.status_code == 200, answered.content


def test_past_due_within_the_grace_period_may_still_spend(tenant, answering, client_for):
    account = billing_account_ensure(organization=tenant.org)
    past_due_set(account=account, since=timezone.now() - timedelta(days=1))
    response = client_for(tenant.owner).post(
        tenant.api(f"deployments/{tenant.deployment}/predict/"),
        {"inputs": [ROW]},
        format="json",
    )
    assert response.status_code == 200, response.content


# The same rule on every route, found by walking the URL patterns: a route that escapes the check
# (a new view, a view that drops the permission class) fails here.

# What each write does, said here and not read from production: a spending route mislabelled as
# a reduction or a change there fails below. A new write route fails until it is added.
EXPECTED_EFFECTS: dict[str, Effect] = {
    # the organization, members, invitations, keys
    "PATCH organization-detail": Effect.CHANGE,
    "PATCH member-detail": Effect.CHANGE,
    "DELETE member-detail": Effect.REDUCE,
    "POST invitation-list": Effect.CHANGE,
    "DELETE invitation-detail": Effect.REDUCE,
    "POST api-key-list": Effect.CHANGE,
    "DELETE api-key-detail": Effect.REDUCE,
    "POST tenants:settings": Effect.CHANGE,
    "POST tenants:members": Effect.CHANGE,
    "POST tenants:member_role": Effect.CHANGE,
    "POST tenants:member_remove": Effect.REDUCE,
    "POST tenants:invitation_revoke": Effect.REDUCE,
    "POST tenants:api_keys": Effect.CHANGE,
    "POST tenants:api_key_revoke": Effect.REDUCE,
    # datasets and models: an empty one only changes; bytes and versions cost storage and work
    "POST dataset-list": Effect.CHANGE,
    "PATCH dataset-detail": Effect.CHANGE,
    "DELETE dataset-detail": Effect.REDUCE,
    "POST dataset-version-list": Effect.SPEND,
    "POST dataset-upload-list": Effect.SPEND,
    "POST dataset-upload-finalize": Effect.SPEND,
    "POST dataset-upload-parts": Effect.SPEND,  # signs URLs that store bytes
    "DELETE dataset-upload-detail": Effect.REDUCE,
    "POST model-list": Effect.CHANGE,
    "PATCH model-detail": Effect.CHANGE,
    "POST model-version-list": Effect.SPEND,
    "PUT model-alias-detail": Effect.CHANGE,
    "DELETE model-alias-detail": Effect.REDUCE,
    "POST model-predict": Effect.READ,  # gone (410): deployments predict
    "POST code-package-list": Effect.SPEND,  # an upload stores bytes
    "POST registry:code_packages": Effect.SPEND,
    "POST registry:datasets": Effect.CHANGE,
    "POST registry:models": Effect.CHANGE,
    "POST registry:model": Effect.CHANGE,
    # jobs and sweeps
    "POST job-list": Effect.SPEND,
    "POST job-estimate": Effect.READ,
    "POST job-cancel": Effect.REDUCE,
    "POST job-retry": Effect.SPEND,
    "POST sweep-list": Effect.SPEND,
    "POST sweep-cancel": Effect.REDUCE,
    "POST jobs:job_submit": Effect.SPEND,
    "POST jobs:job_predict": Effect.SPEND,
    "POST jobs:code_run": Effect.SPEND,
    "POST jobs:model_version_export": Effect.SPEND,
    "POST jobs:job_cancel": Effect.REDUCE,
    "POST jobs:job_retry": Effect.SPEND,
    "POST jobs:sweep_cancel": Effect.REDUCE,
    # deployments: replicas cost slot-seconds, predictions are billed, labels only change
    "POST deployment-list": Effect.SPEND,
    "PATCH deployment-detail": Effect.SPEND,
    "DELETE deployment-detail": Effect.REDUCE,
    "PUT deployment-routes": Effect.SPEND,
    "POST deployment-predict": Effect.SPEND,
    "POST deployment-feedback": Effect.CHANGE,
    "POST deployment-datasets": Effect.SPEND,
    # deployments: creating and routing start replicas, which cost; the retrain policy only
    # changes what the loop may do (the loop's own jobs meet the standing when submitted)
    "POST serving:deployments": Effect.SPEND,
    "POST serving:deployment": Effect.CHANGE,
    "POST serving:deployment_routes": Effect.SPEND,
    # the gate: approving a challenger starts a canary, whose replicas cost slot-seconds;
    # rejecting one ends a retrain, which only lowers spend
    "POST retrain-approve": Effect.SPEND,
    "POST retrain-reject": Effect.REDUCE,
    "POST serving:retrain_approve": Effect.SPEND,
    "POST serving:retrain_reject": Effect.REDUCE,
    # billing
    "PATCH billing-account": Effect.PAY,
    "POST billing-checkout": Effect.PAY,
    "POST billing-portal": Effect.PAY,
    "POST billing:billing": Effect.PAY,
    "POST billing:checkout": Effect.PAY,
    "POST billing:portal": Effect.PAY,
    # webhooks: settings of the organization (no spend); deleting one lowers exposure
    "POST webhook-list": Effect.CHANGE,
    "PATCH webhook-detail": Effect.CHANGE,
    "DELETE webhook-detail": Effect.REDUCE,
    "POST webhook-rotate": Effect.CHANGE,
    "POST webhook-test": Effect.CHANGE,
    "POST webhook-delivery-resend": Effect.CHANGE,
    "POST webhooks:endpoints": Effect.CHANGE,
    "POST webhooks:endpoint": Effect.CHANGE,
    "POST webhooks:endpoint_rotate": Effect.CHANGE,
    "POST webhooks:endpoint_test": Effect.CHANGE,
    "POST webhooks:endpoint_delete": Effect.REDUCE,
    "POST webhooks:delivery_resend": Effect.CHANGE,
}


def expected_effect(route) -> Effect:
    if route.method == "get":
        return Effect.READ
    assert str(route) in EXPECTED_EFFECTS, (
        f"{route} is not in EXPECTED_EFFECTS (tests/security/test_standing.py): add "
        f'"{route}": Effect.<READ|PAY|REDUCE|CHANGE|SPEND>, saying what the route does to spend.'
    )
    return EXPECTED_EFFECTS[str(route)]


@pytest.mark.parametrize("route", ROUTES, ids=str)
def test_each_route_is_labelled_with_what_it_does(route):
    assert action_effect(
        view=route.view_class, action=route.action, method=route.method, scope=route.scope
    ) == expected_effect(route), str(route)


def test_the_table_names_only_routes_that_exist():
    assert set(EXPECTED_EFFECTS) <= {str(route) for route in ROUTES}


SUSPENDED_ROUTES = [route for route in ROUTES if route.kind == "api" or route.method != "get"]


@pytest.mark.parametrize("standing", [STANDINGS[0], STANDINGS[1]], ids=str)
@pytest.mark.parametrize("route", SUSPENDED_ROUTES, ids=str)
def test_every_route_applies_the_standing_to_what_it_does(
    route,
    standing,
    world,  # noqa: F811
    client_for,
):
    org = OrganizationFactory()
    owner = MembershipFactory(organization=org, role=Role.OWNER).user
    case, url = world(route, org, requester=owner)
    standing.reach(org, owner)
    response = _send(client_for(owner), route, url, case)
    effect = expected_effect(route)
    stopped = {Effect.SPEND} | ({Effect.CHANGE} if standing.name == "suspended" else set())
    if effect in stopped:
        assert response.status_code == standing.status, (str(route), effect)
        if route.kind == "api":
            assert response.json()["code"] == standing.code
    else:
        assert response.status_code == CALLS[str(route)].status, (
            str(route),
            effect,
            response.content[:200],
        )
