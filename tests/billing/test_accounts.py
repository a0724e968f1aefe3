"""Accounts, plans, credits and budgets: services, the account API and the billing page."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.core import mail

from billing.errors import BillingError
from billing.models import BudgetAlert, CreditGrant, Plan
from billing.selectors import credits_available
from billing.services import (
    billing_account_ensure,
    budget_alerts_check,
    budget_set,
    credit_grant,
    credits_apply,
    plan_change,
    plan_credits_grant,
    usage_record,
)
from outbox.services import outbox_drain
from registry.models import StorageAccount
from tenants.actors import Actor
from tenants.models import AuditEvent

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)


def _spend(org, cents, at=NOW, key="spend"):
    """Record `cents` of GPU time (a100 at $0.0008 per GPU-second)."""
    return usage_record(
        organization=org,
        resource="gpu:a100-40gb",
        quantity=Decimal(cents) / Decimal("0.08"),
        unit="gpu_second",
        period_start=at - timedelta(hours=1),
        period_end=at,
        idempotency_key=f"{key}:{org.pk}:{cents}:{at.isoformat()}",
    )[0]


def test_a_new_account_gets_the_default_plan_its_quota_and_trial_credit_once(org):
    account = billing_account_ensure(organization=org)
    trial = Plan.objects.get(code="trial")
    assert account.plan == trial and trial.is_default
    assert StorageAccount.objects.get(organization=org).quota_bytes == trial.storage_quota_bytes
    assert billing_account_ensure(organization=org).pk == account.pk
    assert CreditGrant.objects.for_organization(org).get().amount_minor == 5_000
    assert AuditEvent.objects.filter(organization=org, action="billing.credit_granted").count() == 1


def test_changing_plan_moves_the_storage_quota_and_is_audited(org, owner):
    billing_account_ensure(organization=org)
    team = Plan.objects.get(code="team")
    account = plan_change(organization=org, plan=team, actor=Actor(user=owner))
    assert account.plan == team
    assert StorageAccount.objects.get(organization=org).quota_bytes == team.storage_quota_bytes
    event = AuditEvent.objects.get(organization=org, action="billing.plan_changed")
    assert event.data == {"from": "trial", "to": "team"}


def test_an_inactive_plan_cannot_be_chosen(org, owner):
    gone = Plan.objects.create(code="legacy", name="Legacy", active=False)
    with pytest.raises(BillingError):
        plan_change(organization=org, plan=gone, actor=Actor(user=owner))


def test_plan_credits_are_granted_once_a_month(org, other_org, owner):
    plan_change(organization=org, plan=Plan.objects.get(code="team"), actor=Actor(user=owner))
    billing_account_ensure(organization=other_org)  # trial: no monthly credit
    assert plan_credits_grant(at=NOW) == 1
    assert plan_credits_grant(at=NOW + timedelta(days=2)) == 0
    assert plan_credits_grant(at=datetime(2026, 12, 1, tzinfo=UTC)) == 1
    monthly = CreditGrant.objects.for_organization(org).filter(idempotency_key__startswith="plan-m")
    assert monthly.count() == 2


def test_credits_are_consumed_soonest_expiry_first_and_never_below_zero(org):
    now = datetime.now(UTC)
    later, _ = credit_grant(organization=org, amount_minor=300, reason="later", idempotency_key="a")
    soon, _ = credit_grant(
        organization=org,
        amount_minor=200,
        reason="soon",
        expires_at=now + timedelta(days=1),
        idempotency_key="b",
    )
    expired, _ = credit_grant(
        organization=org,
        amount_minor=999,
        reason="expired",
        expires_at=now - timedelta(days=1),
        idempotency_key="c",
    )
    at = datetime.now(UTC)
    assert credits_available(organization=org, at=at) == 500
    assert credits_apply(organization=org, amount_minor=250, at=at) == 250
    soon.refresh_from_db(), later.refresh_from_db(), expired.refresh_from_db()
    assert (soon.remaining_minor, later.remaining_minor, expired.remaining_minor) == (0, 250, 999)
    assert credits_apply(organization=org, amount_minor=10_000, at=at) == 250
    assert credits_available(organization=org, at=at) == 0


def test_credits_granted_after_the_moment_are_left_for_later(org):
    before = datetime.now(UTC)
    credit_grant(organization=org, amount_minor=700, reason="next month", idempotency_key="n")
    assert credits_apply(organization=org, amount_minor=500, at=before) == 0
    assert credits_apply(organization=org, amount_minor=500, at=datetime.now(UTC)) == 500


@pytest.mark.parametrize("amount", [0, -5, 1.5])
def test_credits_must_be_positive_whole_cents(org, amount):
    with pytest.raises(BillingError):
        credit_grant(organization=org, amount_minor=amount, reason="x")


def test_budget_settings_are_validated(org, owner):
    actor = Actor(user=owner)
    with pytest.raises(BillingError, match="hard cap needs a monthly budget"):
        budget_set(
            organization=org, actor=actor, monthly_budget_minor=None, thresholds=[], hard_cap=True
        )
    with pytest.raises(BillingError, match="thresholds"):
        budget_set(
            organization=org, actor=actor, monthly_budget_minor=100, thresholds=[0], hard_cap=False
        )
    account = budget_set(
        organization=org,
        actor=actor,
        monthly_budget_minor=10_000,
        thresholds=[80, 50, 80],
        hard_cap=True,
    )
    assert account.budget_thresholds == [50, 80]
    assert AuditEvent.objects.filter(organization=org, action="billing.budget_set").exists()


def test_each_crossed_threshold_alerts_once_by_email_audit_and_banner(org, owner, client_for):
    budget_set(
        organization=org,
        actor=Actor(user=owner),
        monthly_budget_minor=10_000,
        thresholds=[50, 80, 100],
        hard_cap=False,
    )
    _spend(org, 4_000, key="a")
    assert budget_alerts_check(now=NOW) == 0
    _spend(org, 4_500, key="b")  # 85%: crosses 50 and 80, not 100
    assert budget_alerts_check(now=NOW) == 2
    assert budget_alerts_check(now=NOW) == 0
    assert sorted(BudgetAlert.objects.values_list("threshold", flat=True)) == [50, 80]
    assert mail.outbox == []  # owed with the alerts, sent after their commit
    assert outbox_drain() == 2
    assert [m.to for m in mail.outbox] == [[owner.email], [owner.email]]
    assert sorted(m.subject for m in mail.outbox)[1].startswith(f"{org.name}: 80%")
    assert AuditEvent.objects.filter(organization=org, action="billing.budget_alert").count() == 2
    # The banner reads the current month's alerts: freeze "now" by putting the alerts in it.
    BudgetAlert.objects.update(month=datetime.now(UTC).date().replace(day=1))
    page = client_for(owner).get(f"/o/{org.slug}/")
    assert "used 80% of this month" in page.content.decode()


def test_the_account_api_shows_spend_and_sets_the_budget(org, owner, member_factory, client_for):
    billing_account_ensure(organization=org)  # as when the organization was created
    billing_member = member_factory(org, "billing")
    now = datetime.now(UTC)
    _spend(org, 1_234, at=now)
    client = client_for(billing_member)
    url = f"/api/v1/orgs/{org.slug}/billing/account/"
    body = client.get(url).json()
    assert body["plan"]["code"] == "trial" and body["month_spend_minor"] == 1_234
    assert body["credits_available_minor"] == 5_000 and body["budget_used_percent"] is None
    changed = client.patch(
        url, {"monthly_budget_minor": 1_000, "budget_hard_cap": True}, format="json"
    )
    assert changed.status_code == 200, changed.content
    body = changed.json()
    assert body["budget_hard_cap"] and body["budget_used_percent"] == 123.4
    assert body["placement_blocked"] == "budget reached"
    refused = client.patch(url, {"budget_thresholds": [0]}, format="json")
    assert refused.status_code == 400 and "budget_thresholds" in refused.json()["fields"]
    developer = client_for(member_factory(org, "developer"))
    assert developer.get(url).status_code == 403
    assert client_for(member_factory(org, "admin")).patch(url, {}, format="json").status_code == 403


def test_the_billing_page_keeps_input_after_an_error_and_saves_a_valid_budget(
    org, owner, client_for
):
    client = client_for(owner)
    url = f"/o/{org.slug}/billing/"
    page = client.get(url)
    assert page.status_code == 200 and "Trial" in page.content.decode()
    bad = client.post(url, {"monthly_budget": "250", "budget_thresholds": "50, lots"})
    assert bad.status_code == 400
    html = bad.content.decode()
    assert "Whole percentages" in html and 'value="250"' in html
    good = client.post(
        url, {"monthly_budget": "250.50", "budget_thresholds": "50, 90", "budget_hard_cap": "on"}
    )
    assert good.status_code == 302
    account = billing_account_ensure(organization=org)
    assert (account.monthly_budget_minor, account.budget_thresholds) == (25_050, [50, 90])
    assert account.budget_hard_cap
