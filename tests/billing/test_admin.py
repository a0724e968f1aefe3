"""The operator console for billing: every model lists, plans change through the service."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.apps import apps
from django.utils import timezone

from billing.models import CreditGrant, MeterPush, Plan
from billing.services import billing_account_ensure, usage_record
from tenants.models import AuditEvent
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(client):
    client.force_login(UserFactory(is_staff=True, is_superuser=True))
    return client


def test_every_billing_model_has_a_working_list(staff_client, org):
    billing_account_ensure(organization=org)
    for model in apps.get_app_config("billing").get_models():
        name = model._meta.model_name
        if name == "invoiceline":
            continue  # shown inline on its invoice
        assert staff_client.get(f"/admin/billing/{name}/").status_code == 200, name


def test_changing_a_plan_in_the_admin_goes_through_the_service(staff_client, org):
    account = billing_account_ensure(organization=org)
    team = Plan.objects.get(code="team")
    url = f"/admin/billing/billingaccount/{account.pk}/change/"
    form = {
        "plan": team.pk,
        "billing_email": "",
        "tax_rate_percent": "8.50",
        "monthly_budget_minor": "",
        "budget_thresholds": "[50, 80, 100]",
        "past_due_since_0": "",
        "past_due_since_1": "",
    }
    response = staff_client.post(url, form)
    assert response.status_code == 302, response.content.decode()[:2000]
    account.refresh_from_db()
    assert account.plan == team and account.tax_rate_percent == Decimal("8.50")
    event = AuditEvent.objects.get(organization=org, action="billing.plan_changed")
    assert event.data == {"from": "trial", "to": "team"}


def test_operators_grant_credits_through_the_service(staff_client, org):
    response = staff_client.post(
        "/admin/billing/creditgrant/add/",
        {"organization": org.pk, "amount_minor": 2_500, "reason": "outage", "expires_at_0": "",
         "expires_at_1": ""},
    )  # fmt: skip
    assert response.status_code == 302
    grant = CreditGrant.objects.get(reason="outage")
    assert grant.remaining_minor == 2_500 and grant.granted_by is not None
    assert AuditEvent.objects.filter(organization=org, action="billing.credit_granted").exists()


def test_stuck_meter_events_are_listed_and_can_be_retried(staff_client, org, settings):
    settings.STRIPE_SECRET_KEY = "sk_test_x"
    now = timezone.now()
    rows = [
        usage_record(
            organization=org,
            resource="predictions",
            quantity=Decimal(1),
            unit="1k_predictions",
            period_start=now,
            period_end=now,
            idempotency_key=f"p{i}",
        )[0]
        for i in range(2)
    ]
    MeterPush.objects.filter(usage=rows[0]).update(
        attempts=7, next_attempt_at=now + timedelta(hours=1), last_error="HTTP 500"
    )
    listing = staff_client.get("/admin/billing/meterpush/?stuck=yes").content.decode()
    assert "HTTP 500" in listing and listing.count("HTTP 500") == 1
    staff_client.post(
        "/admin/billing/meterpush/",
        {"action": "retry_now", "_selected_action": [rows[0].pk]},
    )
    assert MeterPush.objects.get(usage=rows[0]).next_attempt_at <= timezone.now()
