"""Pages that stay fast as an organization grows: a fixed number of queries whatever the rows,
no kilobyte-sized columns read for a list, and forms that offer a bounded number of versions.
bench/pages.py has the timings; these catch the regressions cheaply."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from jobs import forms
from tests.factories import (
    DatasetVersionFactory,
    JobFactory,
    MembershipFactory,
    ModelVersionFactory,
    RegisteredModelFactory,
    UserFactory,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def dev(org, member_factory, client):
    client.force_login(member_factory(org, "developer"))
    return client


def jobs_with_everything(org, count):
    """Jobs whose every related row differs, so a missing select_related costs a query each."""
    for _ in range(count):
        JobFactory(
            organization=org,
            created_by=UserFactory(),
            output_model_version=ModelVersionFactory(organization=org),
            input_model_version=ModelVersionFactory(organization=org),
            output_dataset_version=DatasetVersionFactory(organization=org),
            labels={"project": "fraud"},
        )


def queries_for(client, url):
    with CaptureQueriesContext(connection) as queries:
        assert client.get(url).status_code == 200
    return queries


@pytest.mark.parametrize("query", ["", "?state=queued", "?label=project%3Dfraud", "?page=2"])
def test_jobs_list_queries_do_not_grow_with_jobs(org, dev, query):
    url = reverse("jobs:jobs", args=[org.slug]) + query
    jobs_with_everything(org, 51)  # two pages
    queries_for(dev, url)  # the first view stores the organization in the session
    few = len(queries_for(dev, url))
    jobs_with_everything(org, 60)
    assert len(queries_for(dev, url)) == few


def test_jobs_list_does_not_read_version_profiles_or_metrics(org, dev):
    jobs_with_everything(org, 3)
    url = reverse("jobs:jobs", args=[org.slug])
    dev.get(url)
    listing = [q["sql"] for q in queries_for(dev, url) if 'FROM "jobs_job"' in q["sql"]]
    assert listing and not any(
        '"profile"' in sql or '"preview"' in sql or '"metrics"' in sql for sql in listing
    )


def test_org_pages_write_the_session_only_when_the_organization_changes(
    org, other_org, member_factory, client
):
    user = member_factory(org, "developer")
    MembershipFactory(organization=other_org, user=user, role="viewer")
    client.force_login(user)
    url = reverse("jobs:jobs", args=[org.slug])
    client.get(url)
    assert not [q for q in queries_for(client, url) if q["sql"].startswith("UPDATE")]
    client.get(reverse("tenants:overview", args=[other_org.slug]))
    assert client.session["current_org"] == other_org.slug


def test_predict_form_offers_the_newest_versions_and_accepts_any(org, dev, monkeypatch):
    monkeypatch.setattr(forms, "VERSIONS_SHOWN", 3)
    model = RegisteredModelFactory(organization=org)
    versions = [
        ModelVersionFactory(organization=org, registered_model=model, recipe_name="tabular")
        for _ in range(5)
    ]
    oldest, newest = versions[0], versions[-1]
    url = reverse("jobs:job_predict", args=[org.slug])
    html = dev.get(url).content.decode()
    assert f'value="{newest.pk}"' in html and f'value="{oldest.pk}"' not in html
    # A link from an older version's page preselects it even so.
    html = dev.get(url, {"model_version": oldest.pk}).content.decode()
    assert f'<option value="{oldest.pk}" selected>' in html
    form = forms.PredictForm(
        {"model_version": oldest.pk, "dataset_version": DatasetVersionFactory(organization=org).pk},
        organization=org,
    )
    form.is_valid()
    assert "model_version" not in form.errors
