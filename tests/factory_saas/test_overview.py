"""An organization's overview: running and waiting jobs with reasons, spend against budget."""

import pytest

from billing.services import budget_set
from jobs.models import JobState
from tenants.actors import Actor
from tests.factories import JobFactory

pytestmark = pytest.mark.django_db


def test_the_overview_shows_open_jobs_and_spend_against_the_budget(org, owner, client_for):
    JobFactory(organization=org, state=JobState.QUEUED, waiting_reason="no room yet")
    JobFactory(organization=org, state=JobState.QUEUED, waiting_reason="no room yet")
    JobFactory(organization=org, state=JobState.SUCCEEDED)
    budget_set(
        organization=org,
        actor=Actor(user=owner),
        monthly_budget_minor=12_300,
        thresholds=[],
        hard_cap=False,
    )
    html = client_for(owner).get(f"/o/{org.slug}/").content.decode()
    assert "<strong>0</strong> running, <strong>2</strong> waiting" in html
    assert "#2 · no room yet" in html
    assert "of $123.00" in html and "Usage report" in html


def test_each_panel_needs_its_scope(org, member_factory, client_for):
    viewer = member_factory(org, "viewer")
    html = client_for(viewer).get(f"/o/{org.slug}/").content.decode()
    assert "Nothing running or waiting." in html
    assert "Spend this month" not in html
    billing = member_factory(org, "billing")
    html = client_for(billing).get(f"/o/{org.slug}/").content.decode()
    assert "Spend this month" in html and "running," not in html
