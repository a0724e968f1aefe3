"""The scheduler honours money: hard-capped budgets, past-due payment after grace, plan quotas."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from billing.models import Plan
from billing.services import billing_account_ensure, budget_set, plan_change, usage_record
from billing.stripe_events import past_due_clear, past_due_set
from jobs.models import JobState
from jobs.scheduler.apply import scheduler_pass
from tenants.actors import Actor
from tenants.models import Organization
from tests.factories import JobFactory

pytestmark = pytest.mark.django_db


def _pass(job):
    scheduler_pass()
    job.refresh_from_db()
    return job


def _spend(org, cents):
    now = timezone.now()
    usage_record(
        organization=org,
        resource="gpu:a100-40gb",
        quantity=Decimal(cents) / Decimal("0.08"),
        unit="gpu_second",
        period_start=now - timedelta(minutes=5),
        period_end=now,
        idempotency_key=f"spent:{org.pk}:{cents}",
    )


def test_a_reached_hard_cap_keeps_new_jobs_waiting_until_the_budget_is_raised(
    register_worker, org, owner
):
    register_worker("cpu-1")
    actor = Actor(user=owner)
    budget_set(
        organization=org, actor=actor, monthly_budget_minor=500, thresholds=[], hard_cap=True
    )
    _spend(org, 500)
    job = _pass(JobFactory(organization=org))
    assert (job.state, job.waiting_reason) == (JobState.QUEUED, "budget reached")
    budget_set(
        organization=org, actor=actor, monthly_budget_minor=800, thresholds=[], hard_cap=True
    )
    assert _pass(job).state == JobState.SCHEDULED


def test_a_budget_without_hard_cap_only_alerts(register_worker, org, owner):
    register_worker("cpu-1")
    budget_set(
        organization=org,
        actor=Actor(user=owner),
        monthly_budget_minor=100,
        thresholds=[100],
        hard_cap=False,
    )
    _spend(org, 500)
    assert _pass(JobFactory(organization=org)).state == JobState.SCHEDULED


def test_past_due_stops_placements_after_the_grace_period_and_payment_restores(
    register_worker, org, settings
):
    register_worker("cpu-1")
    settings.BILLING_PAST_DUE_GRACE_DAYS = 3
    account = billing_account_ensure(organization=org)
    past_due_set(account=account, since=timezone.now() - timedelta(days=1))
    org.refresh_from_db()
    assert org.status == Organization.Status.PAST_DUE
    first = _pass(JobFactory(organization=org))
    assert first.state == JobState.SCHEDULED  # still inside the grace period
    past_due_set(account=account, since=timezone.now() - timedelta(days=4))
    waiting = _pass(JobFactory(organization=org))
    assert waiting.state == JobState.QUEUED and "payment past due" in waiting.waiting_reason
    past_due_clear(account=account)
    org.refresh_from_db()
    assert org.status == Organization.Status.ACTIVE
    assert _pass(waiting).state == JobState.SCHEDULED


def test_the_plan_sets_the_default_quota(register_worker, org, owner, a100):
    register_worker("gpu-1", gpus=4)
    billing_account_ensure(organization=org)  # trial: at most 2 GPUs at a time
    big = _pass(JobFactory(organization=org, resource_class=a100, gpu_count=4))
    assert big.state == JobState.QUEUED and "quota" in big.waiting_reason
    plan_change(organization=org, plan=Plan.objects.get(code="payg"), actor=Actor(user=owner))
    assert _pass(big).state == JobState.SCHEDULED
