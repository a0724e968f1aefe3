"""What an organization needs for billing is made when the organization is, and reading billing
(pages, panels, API) writes nothing."""

import importlib

import pytest
from django.apps import apps
from django.db import connection
from django.test.utils import CaptureQueriesContext

from billing.models import BillingAccount, CreditGrant, Plan
from outbox.models import Message
from registry.models import StorageAccount
from tenants.models import AuditEvent, Organization
from tests.factories import MembershipFactory, OrganizationFactory

pytestmark = pytest.mark.django_db

WRITES = ("INSERT", "UPDATE", "DELETE")


def _row_counts() -> dict[str, int]:
    models = [
        *apps.get_app_config("billing").get_models(),
        *apps.get_app_config("registry").get_models(),
        *apps.get_app_config("outbox").get_models(),
    ]
    return {model._meta.label: model.objects.count() for model in models}


def _writes(queries) -> list[str]:
    """Writes to any table but the session's (the session framework may refresh its row)."""
    return [
        q["sql"]
        for q in queries
        if q["sql"].lstrip().upper().startswith(WRITES) and '"django_session"' not in q["sql"]
    ]


def _new_organization(client_for, user) -> Organization:
    response = client_for(user).post("/api/v1/orgs/", {"name": "Fresh Co"}, format="json")
    assert response.status_code == 201, response.content
    return Organization.objects.get(slug=response.json()["slug"])


def test_a_new_organization_has_its_account_credit_and_storage_from_the_start(
    user, client_for, fake_stripe
):
    org = _new_organization(client_for, user)

    account = BillingAccount.objects.get(organization=org)
    trial = Plan.objects.get(code="trial")
    assert account.plan == trial
    [credit] = CreditGrant.objects.filter(organization=org)
    assert (credit.amount_minor, credit.remaining_minor) == (5_000, 5_000)
    assert StorageAccount.objects.get(organization=org).quota_bytes == trial.storage_quota_bytes
    # Its Stripe customer and subscription are owed, not made inside the request's transaction.
    assert Message.objects.filter(handler__endswith="subscription_sync").count() == 1
    assert fake_stripe.requests == []


READS = [
    "/o/{slug}/billing/",
    "/o/{slug}/",
    "/o/{slug}/billing/usage/",
    "/api/v1/orgs/{slug}/billing/account/",
    "/api/v1/orgs/{slug}/billing/usage/",
    "/api/v1/orgs/{slug}/billing/credits/",
]


@pytest.mark.parametrize("path", READS)
def test_reading_billing_writes_no_row(path, user, client_for, fake_stripe):
    org = _new_organization(client_for, user)
    client = client_for(user)
    before = _row_counts()

    with CaptureQueriesContext(connection) as queries:
        response = client.get(path.format(slug=org.slug))

    assert response.status_code == 200, response.content
    assert _writes(queries) == []
    assert _row_counts() == before


@pytest.mark.parametrize("path", READS)
def test_reading_billing_of_an_organization_made_elsewhere_writes_no_row(
    path, client_for, fake_stripe
):
    """An organization made without the service (a fixture, the admin) reads as the default
    plan with nothing stored; the first write that needs the account makes it."""
    org = OrganizationFactory()
    client = client_for(MembershipFactory(organization=org, role="owner").user)
    before = _row_counts()

    with CaptureQueriesContext(connection) as queries:
        response = client.get(path.format(slug=org.slug))

    assert response.status_code == 200, response.content
    assert _writes(queries) == []
    assert _row_counts() == before


def test_the_backfill_opens_what_older_organizations_lack_once(org, other_org):
    """Migrations registry 0004 and billing 0009, run over organizations made before."""
    billing_0009 = importlib.import_module(
        "billing.migrations.0009_open_accounts_of_existing_organizations"
    )
    registry_0004 = importlib.import_module("registry.migrations.0004_open_storage_accounts")
    StorageAccount.objects.create(organization=other_org, quota_bytes=1, used_bytes=1)

    for _ in range(2):  # a second run finds nothing to open
        registry_0004.open_accounts(apps, None)
        billing_0009.open_accounts(apps, None)

    trial = Plan.objects.get(code="trial")
    for organization in (org, other_org):
        assert BillingAccount.objects.get(organization=organization).plan == trial
        storage = StorageAccount.objects.get(organization=organization)
        assert storage.quota_bytes == trial.storage_quota_bytes
        [credit] = CreditGrant.objects.filter(organization=organization)
        assert credit.remaining_minor == 5_000
        audit = AuditEvent.objects.get(organization=organization, action="billing.credit_granted")
        assert audit.target_id == str(credit.pk)
    assert StorageAccount.objects.get(organization=other_org).used_bytes == 1
