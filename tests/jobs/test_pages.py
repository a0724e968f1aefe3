"""Job pages: the generated submit form, the live job page and its metric charts."""

import pytest
from django.urls import reverse

from jobs.models import Job
from jobs.scheduler.apply import scheduler_pass
from jobs.services.attempts import Report, attempt_claim, attempt_report
from jobs.views import metric_chart
from tests.factories import DatasetVersionFactory, JobFactory, ModelVersionFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def dev(org, member_factory, client):
    client.force_login(member_factory(org, "developer"))
    return client


def test_submit_form_is_generated_from_the_recipe_schema(org, dev):
    version = DatasetVersionFactory(organization=org)
    url = reverse("jobs:job_submit", args=[org.slug]) + "?recipe=tabular-classifier"
    page = dev.get(url)
    html = page.content.decode()
    assert (
        'name="param_target"' in html
        and 'name="param_hidden_sizes"' in html
        and 'value="64, 32"' in html
    )
    response = dev.post(
        url,
        {
            "dataset_version": version.pk,
            "resource_class": "cpu",
            "gpu_count": 1,
            "priority": 0,
            "max_runtime_s": 600,
            "param_target": "x",
            "param_epochs": 3,
            "param_hidden_sizes": "16, 8",
            "labels": "project=fraud",
        },
    )
    job = Job.objects.get()
    assert response["Location"] == reverse("jobs:job", args=[org.slug, job.pk])
    assert job.parameters["hidden_sizes"] == [16, 8] and job.labels == {"project": "fraud"}


def test_submit_form_keeps_input_and_names_the_bad_parameter(org, dev):
    version = DatasetVersionFactory(organization=org)
    response = dev.post(
        reverse("jobs:job_submit", args=[org.slug]) + "?recipe=tabular-classifier",
        {
            "dataset_version": version.pk,
            "resource_class": "cpu",
            "gpu_count": 1,
            "priority": 0,
            "max_runtime_s": 600,
            "param_target": "x",
            "param_epochs": 0,
        },
    )
    assert response.status_code == 400
    assert b"greater than or equal to 1" in response.content and not Job.objects.exists()


def test_job_page_shows_logs_a_chart_and_refreshes_while_active(org, dev, register_worker):
    worker = register_worker("cpu-page")
    job = JobFactory(organization=org)
    scheduler_pass()
    job.refresh_from_db()
    attempt_claim(job_id=job.pk, attempt=job.attempt, worker_id=worker.pk)
    attempt_report(
        job_id=job.pk,
        attempt=job.attempt,
        report=Report(
            logs=[("stdout", "epoch 1 done")],
            metrics=[
                {"step": s, "name": "loss", "split": "train", "value": 1 / s} for s in range(1, 6)
            ],
        ),
    )
    url = reverse("jobs:job", args=[org.slug, job.pk])
    html = dev.get(url).content.decode()
    assert "epoch 1 done" in html and "<polyline" in html and 'hx-trigger="every 2s"' in html
    partial = dev.get(url, HTTP_HX_REQUEST="true").content.decode()
    assert partial.lstrip().startswith('<div id="job-live"') and "<html" not in partial
    # A boosted navigation (a link, or the submit form's redirect) gets the whole page.
    boosted = dev.get(url, HTTP_HX_REQUEST="true", HTTP_HX_BOOSTED="true").content.decode()
    assert "<html" in boosted and "<h1>" in boosted


def test_metric_chart_spans_the_steps_and_the_values_from_lowest_to_highest():
    chart = metric_chart([(0, 1.0), (10, 0.0), (20, 0.5)])
    assert chart["points"] == "0.0,0.0 300.0,160.0 600.0,80.0"
    assert (chart["min"], chart["max"], chart["last"]) == (0.0, 1.0, 0.5)
    assert (chart["width"], chart["height"]) == (600, 160)
    # A flat series lies on the bottom edge; a single point draws nothing.
    assert metric_chart([(1, 2.0), (3, 2.0)])["points"] == "0.0,160.0 600.0,160.0"
    assert metric_chart([(1, 2.0)]) is None


def test_jobs_list_shows_queue_position_and_reason(org, dev, register_worker):
    register_worker("cpu-list")
    jobs = [JobFactory(organization=org) for _ in range(3)]
    scheduler_pass()
    html = dev.get(reverse("jobs:jobs", args=[org.slug])).content.decode()
    waiting = Job.objects.get(pk=jobs[2].pk)
    assert f"#{waiting.queue_position}" in html and waiting.waiting_reason in html


def test_batch_prediction_page_queues_an_inference_job(org, dev):
    model_version = ModelVersionFactory(organization=org, recipe_name="tabular-classifier")
    dataset = DatasetVersionFactory(organization=org)
    url = reverse("jobs:job_predict", args=[org.slug])
    assert str(model_version).encode() in dev.get(url, {"model_version": model_version.pk}).content
    response = dev.post(
        url,
        {"model_version": model_version.pk, "dataset_version": dataset.pk, "resource_class": "cpu"},
    )
    job = Job.objects.get()
    assert response["Location"] == reverse("jobs:job", args=[org.slug, job.pk])
    assert (job.kind, job.recipe, job.input_model_version) == (
        "infer",
        "tabular-classifier",
        model_version,
    )
    assert job.output_dataset_name == f"{model_version.registered_model.name}-predictions"


def test_an_unknown_recipe_on_the_submit_page_is_a_404(org, dev):
    assert (
        dev.get(reverse("jobs:job_submit", args=[org.slug]), {"recipe": "nope"}).status_code == 404
    )


def test_a_refusal_without_a_field_is_shown_on_the_submit_form(org, dev, cpu):
    from jobs.models import Quota

    Quota.objects.create(organization=org, resource_class=cpu, limit_gpus=8, max_queued_jobs=0)
    version = DatasetVersionFactory(organization=org)
    response = dev.post(
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
    assert response.status_code == 400 and b"already queued" in response.content
