"""Job pages: the generated submit form, the live job page and its metric charts."""

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from factory_saas.templatetags.money import usage_text
from jobs.charts import HOVER_POINTS, metric_chart
from jobs.models import Job, JobAttempt, JobMetric, JobState
from jobs.scheduler.apply import scheduler_pass
from jobs.selectors import slot_seconds_attach
from jobs.services.attempts import Report, attempt_claim, attempt_report
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


def test_metric_chart_spans_the_steps_on_a_round_scale_around_the_values():
    chart = metric_chart("train loss", [(0, 1.0), (10, 0.0), (20, 0.5)])
    # Steps run edge to edge; values from the lowest tick (0.0, the baseline) to the highest (1.0).
    assert chart["points"] == "56.0,22.0 258.0,196.0 460.0,109.0"
    assert [tick["label"] for tick in chart["ticks"]] == ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]
    assert [label.text for label in chart["x_labels"]] == ["0", "5", "10", "15", "20"]
    assert (chart["x_unit"], chart["y_unit"]) == ("step", "train loss")
    assert [(p["step"], p["label"]) for p in chart["hover"]] == [(0, "1"), (10, "0"), (20, "0.5")]
    assert (chart["min"], chart["max"], chart["last"]) == (0.0, 1.0, 0.5)
    # A flat series is drawn mid-height on a scale around it; a single point draws nothing.
    flat = metric_chart("lr", [(1, 2.0), (3, 2.0)])
    assert flat["points"] == "56.0,109.0 460.0,109.0" and flat["ticks"][0]["label"] == "1.0"
    assert flat["ticks"][-1]["label"] == "3.0"
    assert metric_chart("lr", [(1, 2.0)]) is None


def test_a_long_metric_keeps_its_whole_line_but_hovers_a_bounded_number_of_points():
    chart = metric_chart("loss", [(step, 1 / (step + 1)) for step in range(5000)])
    assert chart["points"].count(",") == 5000
    assert len(chart["hover"]) <= HOVER_POINTS + 1 and chart["hover"][-1]["step"] == 4999


def test_job_page_chart_has_axes_units_and_a_value_per_point_on_hover(org, dev):
    job = JobFactory(organization=org, state=JobState.SUCCEEDED)
    JobMetric.objects.bulk_create(
        JobMetric(
            organization=org, job=job, attempt=1, step=step, name="loss", split="train", value=value
        )
        for step, value in [(1, 0.9), (2, 0.5), (3, 0.25)]
    )
    html = dev.get(reverse("jobs:job", args=[org.slug, job.pk])).content.decode()
    svg = html[html.index('<figure id="metric-1">') : html.index("</figure>")]
    assert 'class="usage-chart-grid"' in svg and svg.count("<line ") == 5  # a grid line per tick
    assert ">0.2</text>" in svg and ">1.0</text>" in svg  # value axis
    assert ">1</text>" in svg and ">3</text>" in svg  # step axis
    assert 'class="chart-unit"' in svg and ">step</text>" in svg and ">train loss</text>" in svg
    assert "<title>train loss, step 2: 0.5</title>" in svg


def test_a_job_priced_at_nothing_shows_the_work_beside_its_cost(org, dev):
    job = JobFactory(organization=org, state=JobState.SUCCEEDED, cost_minor=0)
    started = timezone.now() - timedelta(minutes=5)
    JobAttempt.objects.create(
        organization=org,
        job=job,
        number=1,
        started_at=started,
        ended_at=started + timedelta(seconds=42),
        outcome=JobAttempt.Outcome.SUCCEEDED,
    )
    shown = '$0.00 <span class="muted">· 42 CPU-seconds</span>'
    assert shown in dev.get(reverse("jobs:jobs", args=[org.slug])).content.decode()
    assert shown in dev.get(reverse("jobs:job", args=[org.slug, job.pk])).content.decode()


def test_slot_seconds_count_every_slot_and_a_running_attempt_up_to_now(org):
    job = JobFactory(organization=org, gpu_count=2, state=JobState.RUNNING, attempt=2)
    now = timezone.now()
    JobAttempt.objects.create(
        organization=org,
        job=job,
        number=1,
        started_at=now - timedelta(hours=2),
        ended_at=now - timedelta(hours=1, minutes=30),
        outcome=JobAttempt.Outcome.PREEMPTED,
    )
    JobAttempt.objects.create(
        organization=org,
        job=job,
        number=2,
        started_at=now - timedelta(minutes=30),
        outcome=JobAttempt.Outcome.ACTIVE,
    )
    slot_seconds_attach(organization=org, jobs=[job], now=now)
    assert job.slot_seconds == 2 * 3600
    assert usage_text(job.slot_seconds, "a100-40gb") == "2.00 GPU-hours"
    assert usage_text(1, "cpu") == "1 CPU-second"


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
