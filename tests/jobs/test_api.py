"""The jobs API: submit with an idempotency key and a cost estimate, list filters, logs, cancel."""

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from jobs.models import Job, JobAttempt, JobState
from jobs.scheduler.apply import scheduler_pass
from jobs.services.attempts import Report, attempt_claim, attempt_report
from tests.factories import DatasetVersionFactory, JobFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def dev(org, member_factory, client_for):
    return client_for(member_factory(org, "developer"))


def _body(version, **extra):
    return {
        "recipe": "tabular-classifier",
        "parameters": {"target": "x"},
        "dataset": {"dataset": version.dataset.name, "number": version.number},
        **extra,
    }


def test_submit_returns_the_job_with_a_cost_estimate_and_is_idempotent(org, dev):
    version = DatasetVersionFactory(organization=org)
    url = f"/api/v1/orgs/{org.slug}/jobs/"
    first = dev.post(
        url,
        _body(version, labels={"project": "fraud"}, max_runtime_s=7200),
        format="json",
        HTTP_IDEMPOTENCY_KEY="k1",
    )
    assert first.status_code == 201, first.content
    body = first.json()
    assert body["state"] == "queued" and body["labels"] == {"project": "fraud"}
    assert body["estimated_cost_per_hour"] == {"amount": "0.0720", "currency": "usd"}
    # The most it can cost: rate x GPUs x max runtime (2 hours).
    assert body["estimated_max_cost"] == {"amount": "0.14", "currency": "usd"}
    again = dev.post(url, _body(version), format="json", HTTP_IDEMPOTENCY_KEY="k1")
    assert again.status_code == 200 and again.json()["id"] == body["id"]
    assert Job.objects.count() == 1


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"parameters": {"target": "x", "epochs": 0}}, "parameters.epochs"),
        ({"resource_class": "tpu-v9"}, "resource_class"),
        ({"dataset": {"dataset": "nope", "number": 1}}, "dataset"),
        ({"recipe": "shell"}, "recipe"),
        # Replicas come from deployments: a tenant cannot start one, billed, through this API.
        ({"kind": "serve"}, "kind"),
    ],
)
def test_bad_submissions_are_400_with_the_field_named(org, dev, extra, field):
    version = DatasetVersionFactory(organization=org)
    response = dev.post(
        f"/api/v1/orgs/{org.slug}/jobs/", {**_body(version), **extra}, format="json"
    )
    assert response.status_code == 400, response.content
    assert field in response.json().get("fields", {}), response.json()


def test_a_dataset_of_another_organization_cannot_be_used(org, other_org, dev):
    foreign = DatasetVersionFactory(organization=other_org)
    response = dev.post(f"/api/v1/orgs/{org.slug}/jobs/", _body(foreign), format="json")
    assert response.status_code == 400 and not Job.objects.exists()


def test_list_filters_by_state_and_label(org, dev):
    JobFactory(organization=org, labels={"project": "fraud"})
    JobFactory(organization=org, labels={"project": "churn"}, state=JobState.CANCELLED)
    url = f"/api/v1/orgs/{org.slug}/jobs/"
    assert [j["labels"] for j in dev.get(url, {"label": "project=fraud"}).json()["results"]] == [
        {"project": "fraud"}
    ]
    assert [j["state"] for j in dev.get(url, {"state": "cancelled"}).json()["results"]] == [
        "cancelled"
    ]
    assert dev.get(url, {"state": "exploded"}).status_code == 400


def test_logs_tail_after_an_id_and_metrics(org, dev, register_worker):
    worker = register_worker("cpu-api")
    job = JobFactory(organization=org)
    scheduler_pass()
    job.refresh_from_db()
    attempt_claim(job_id=job.pk, attempt=job.attempt, worker_id=worker.pk)
    attempt_report(
        job_id=job.pk,
        attempt=job.attempt,
        report=Report(
            logs=[("stdout", "one"), ("stdout", "two")],
            metrics=[{"step": 3, "name": "loss", "value": 0.2}],
        ),
    )
    url = f"/api/v1/orgs/{org.slug}/jobs/{job.pk}/"
    lines = dev.get(url + "logs/").json()
    assert [line["line"] for line in lines] == ["one", "two"]
    assert [line["line"] for line in dev.get(url + "logs/", {"after": lines[0]["id"]}).json()] == [
        "two"
    ]
    assert dev.get(url + "metrics/").json()[0]["value"] == 0.2
    assert {e["kind"] for e in dev.get(url + "events/").json()} >= {"scheduled", "started"}
    assert dev.get(url).json()["cost_so_far_minor"] >= 0


def test_cancel_then_retry_through_the_api(org, dev):
    job = JobFactory(organization=org)
    url = f"/api/v1/orgs/{org.slug}/jobs/{job.pk}/"
    assert dev.post(url + "cancel/").json()["state"] == "cancelled"
    assert dev.post(url + "cancel/").status_code == 409
    retried = dev.post(url + "retry/")
    assert retried.status_code == 201 and retried.json()["retry_of"] == job.pk


def test_recipes_and_resource_classes_are_listed_for_any_signed_in_caller(dev, api_client):
    recipes = {recipe["name"]: recipe for recipe in dev.get("/api/v1/recipes/").json()}
    expected = {
        "tabular-classifier",
        "image-classifier",
        "text-classifier",
        "timeseries-forecaster",
    }
    assert set(recipes) >= expected
    assert "target" in recipes["tabular-classifier"]["parameter_schema"]["properties"]
    classes = {c["name"]: c for c in dev.get("/api/v1/resource-classes/").json()}
    assert classes["a100-40gb"]["price_per_gpu_hour"] == "2.8800"
    assert api_client.get("/api/v1/recipes/").status_code == 401


def test_a_label_key_cannot_become_a_database_lookup(org, dev):
    JobFactory(organization=org, labels={"a": "b"})
    response = dev.get(f"/api/v1/orgs/{org.slug}/jobs/", {"label": "a__regex=("})
    assert response.status_code == 200 and response.json()["results"] == []


def test_an_overlong_idempotency_key_is_a_400(org, dev):
    version = DatasetVersionFactory(organization=org)
    response = dev.post(
        f"/api/v1/orgs/{org.slug}/jobs/",
        _body(version),
        format="json",
        HTTP_IDEMPOTENCY_KEY="k" * 201,
    )
    assert response.status_code == 400 and "idempotency_key" in response.json()["fields"]


def test_the_old_online_prediction_route_is_gone_and_points_at_deployments(
    org, dev, member_factory, client_for, local_store, weights_bytes
):
    """It answered from weights loaded into the web process; deployments answer now, so it is
    a 410 that says where to go, for anyone who may see the model, and bills nothing."""
    from django.core.files.uploadedfile import SimpleUploadedFile

    from billing.models import UsageRecord

    dev.post(f"/api/v1/orgs/{org.slug}/models/", {"name": "churn"}, format="json")
    registered = dev.post(
        f"/api/v1/orgs/{org.slug}/models/churn/versions/",
        {
            "weights": SimpleUploadedFile("model.safetensors", weights_bytes),
            "config": '{"layers": [3, 2]}',
            "recipe_name": "tabular-classifier",
        },
        format="multipart",
    )
    assert registered.status_code == 201, registered.content
    url = f"/api/v1/orgs/{org.slug}/models/churn/predict/"
    for client in (dev, client_for(member_factory(org, "viewer"))):
        response = client.post(url, {"version": "1", "rows": [{"x": 1}]}, format="json")
        body = response.json()
        assert response.status_code == 410, body
        assert body["code"] == "online_prediction_moved"
        assert f"/api/v1/orgs/{org.slug}/deployments/<deployment>/predict/" in body["detail"]
    assert not UsageRecord.objects.filter(organization=org, resource="predictions").exists()
    assert dev.post(f"/api/v1/orgs/{org.slug}/models/nope/predict/", {}).status_code == 404


def test_estimate_before_submitting_is_price_times_gpus_times_max_runtime(org, dev):
    url = f"/api/v1/orgs/{org.slug}/jobs/estimate/"
    body = {"resource_class": "a100-40gb", "gpu_count": 4, "max_runtime_s": 7200}
    response = dev.post(url, body, format="json")
    assert response.status_code == 200, response.content
    # $0.0008 per GPU-second x 4 GPUs x 2 hours.
    assert response.json() == {
        "estimated_cost_per_hour": {"amount": "11.5200", "currency": "usd"},
        "estimated_max_cost": {"amount": "23.04", "currency": "usd"},
    }
    unknown = dev.post(url, {"resource_class": "tpu"}, format="json")
    assert unknown.status_code == 400 and "resource_class" in unknown.json()["fields"]
    assert not Job.objects.exists()


def test_job_list_prices_running_jobs_in_a_fixed_number_of_queries(org, dev):
    """Each running job's cost so far is on the list page, without two queries per job."""
    url = f"/api/v1/orgs/{org.slug}/jobs/"

    def add_running(count):
        for _ in range(count):
            job = JobFactory(organization=org, state=JobState.RUNNING, attempt=1)
            JobAttempt.objects.create(
                organization=org,
                job=job,
                number=1,
                started_at=timezone.now() - timedelta(hours=1),
            )

    add_running(1)
    dev.get(url)
    with CaptureQueriesContext(connection) as one:
        dev.get(url)
    add_running(4)
    with CaptureQueriesContext(connection) as five:
        listed = dev.get(url).json()["results"]
    assert len(five.captured_queries) == len(one.captured_queries)
    # The job's own page agrees (to the cent a second later), and an hour costs something.
    for row in listed:
        alone = dev.get(f"{url}{row['id']}/").json()["cost_so_far_minor"]
        assert 0 < row["cost_so_far_minor"] <= alone <= row["cost_so_far_minor"] + 1
