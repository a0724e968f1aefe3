"""drift_check over the real database: windows of the prediction log become DriftReports once,
a drifted window goes on the timeline and the audit log, and a check reads only its own
organization's rows."""

import threading
from datetime import timedelta

import numpy as np
import pytest
from django.db import connection
from django.utils import timezone

from jobs.models import ResourceClass
from registry.formats.profiling import NumericSummary, TopValues
from serving.models import Deployment, DriftReport, LoopEvent, PredictionLog, Route
from serving.monitoring import drift_check, drift_check_recent
from tenants.models import AuditEvent
from tests.factories import DatasetVersionFactory, ModelVersionFactory

# Small windows are noisy (at 100 rows a W1 of 0.1 standard deviations is chance); 500 is not.
WINDOW = 500


def numeric_profile(values):
    summary = NumericSummary(sample_size=10_000, seed=1)
    summary.add_array(np.asarray(values, dtype=np.float64))
    return summary.profile(nulls=0)


def categorical_profile(values):
    top = TopValues(100)
    for value in values:
        top.add(value)
    return top.profile(count=len(values), nulls=0)


@pytest.fixture
def make_deployment(db):
    def make(organization, *, recipe="tabular-classifier", profile=None):
        version = ModelVersionFactory(
            organization=organization,
            recipe_name=recipe,
            input_signature={
                "columns": [{"name": "x", "dtype": "float64"}, {"name": "city", "dtype": "string"}],
                "target": "label",
            },
        )
        if profile is not None:
            dataset_version = DatasetVersionFactory(organization=organization, profile=profile)
            version.trained_on.add(dataset_version)
        deployment = Deployment.objects.create(
            organization=organization,
            name=f"d-{version.pk}",
            recipe=recipe,
            resource_class=ResourceClass.objects.get(name="cpu"),
            drift_window_rows=WINDOW,
        )
        Route.objects.create(
            organization=organization, deployment=deployment, model_version=version, weight=100
        )
        return deployment, version

    return make


def tabular_profile(rng):
    return {
        "x": numeric_profile(rng.normal(0, 1, 20_000)),
        "city": categorical_profile(rng.choice(["a", "b", "c"], 20_000).tolist()),
        "label": categorical_profile(rng.choice(["yes", "no"], 20_000).tolist()),
    }


def log(deployment, version, rows, *, start, organization=None, labels=None):
    """Log `rows` as the request path does: prediction rows, and the deployment's last request."""
    labels = labels or ["yes", "no"] * (len(rows) // 2) + ["yes"] * (len(rows) % 2)
    last = start + timedelta(milliseconds=len(rows))
    Deployment.objects.filter(pk=deployment.pk).update(last_request_at=last)
    PredictionLog.objects.bulk_create(
        PredictionLog(
            organization=organization or deployment.organization,
            deployment=deployment,
            model_version=version,
            inputs=inputs,
            output={"label": label},
            latency_ms=1.0,
            created_at=start + timedelta(milliseconds=index),
        )
        for index, (inputs, label) in enumerate(zip(rows, labels, strict=True))
    )


def rows_from(rng, count, *, shift=0.0, cities=("a", "b", "c")):
    return [
        {"x": float(x), "city": str(city)}
        for x, city in zip(rng.normal(shift, 1, count), rng.choice(cities, count), strict=True)
    ]


def test_each_full_window_is_reported_once(org, make_deployment):
    rng = np.random.default_rng(1)
    deployment, version = make_deployment(org, profile=tabular_profile(rng))
    start = timezone.now() - timedelta(hours=1)
    log(deployment, version, rows_from(rng, 2 * WINDOW + 30), start=start)

    reports = drift_check(deployment)

    assert [report.rows for report in reports] == [WINDOW, WINDOW]
    assert reports[0].window_end < reports[1].window_start
    assert not any(report.drifted for report in reports)
    assert set(reports[0].columns) == {"x", "city"}  # the target is not an input
    assert reports[0].prediction_drift["reference"] == "training"
    assert drift_check(deployment) == []
    assert DriftReport.objects.for_organization(org).count() == 2
    assert not LoopEvent.objects.for_organization(org).exists()

    # The 30 left over wait until the window is full.
    log(deployment, version, rows_from(rng, WINDOW - 30), start=start + timedelta(minutes=5))
    [third] = drift_check(deployment)
    assert third.rows == WINDOW


def test_a_drifted_window_goes_on_the_timeline_and_the_audit_log(org, make_deployment):
    rng = np.random.default_rng(2)
    deployment, version = make_deployment(org, profile=tabular_profile(rng))
    start = timezone.now() - timedelta(hours=1)
    log(deployment, version, rows_from(rng, WINDOW, shift=1.0, cities=("z",)), start=start)

    [report] = drift_check(deployment)

    assert report.drifted and report.drifted_share == 1.0
    assert report.columns["x"]["drifted"] and report.columns["city"]["distance"] > 0.9
    [event] = LoopEvent.objects.for_organization(org).filter(deployment=deployment)
    assert event.kind == LoopEvent.Kind.DRIFT_DETECTED
    assert event.model_version == version
    assert event.data["drift_report"] == report.pk
    assert sorted(event.data["drifted_columns"]) == ["city", "x"]
    audit = AuditEvent.objects.get(organization=org, action="serving.drift_detected")
    assert audit.actor_label == "system"
    drift_check(deployment)
    assert LoopEvent.objects.for_organization(org).count() == 1


def test_classifier_predictions_are_compared_with_the_first_window_without_training_labels(
    org, make_deployment
):
    deployment, version = make_deployment(org, recipe="image-classifier")
    start = timezone.now() - timedelta(hours=1)
    balanced = ["cat", "dog"] * (WINDOW // 2)
    log(deployment, version, [{}] * WINDOW, start=start, labels=balanced)
    log(deployment, version, [{}] * WINDOW, start=start + timedelta(minutes=1), labels=balanced)
    skewed = ["cat"] * (WINDOW - 5) + ["dog"] * 5
    log(deployment, version, [{}] * WINDOW, start=start + timedelta(minutes=2), labels=skewed)

    first, same, moved = drift_check(deployment)

    # Inputs without an image read as missing features; the first window is their baseline.
    assert {column["reference"] for column in first.columns.values()} == {"this_window"}
    assert first.prediction_drift["reference"] == "this_window" and not first.drifted
    assert same.prediction_drift["reference"] == "first_window"
    assert same.prediction_drift["distance"] == pytest.approx(0.0, abs=1e-6)
    assert not same.drifted
    assert moved.prediction_drift["distance"] > 0.1 and moved.drifted
    assert LoopEvent.objects.for_organization(org).get().data["drift_report"] == moved.pk


def test_text_inputs_drift_by_their_length_against_the_first_window(org, make_deployment):
    deployment, version = make_deployment(org, recipe="text-classifier")
    start = timezone.now() - timedelta(hours=1)
    rng = np.random.default_rng(8)

    def texts(mean_words):
        return [{"text": " ".join(["word"] * int(n))} for n in rng.poisson(mean_words, WINDOW)]

    labels = ["pos", "neg"] * (WINDOW // 2)
    log(deployment, version, texts(20), start=start, labels=labels)
    log(deployment, version, texts(20), start=start + timedelta(minutes=1), labels=labels)
    log(deployment, version, texts(60), start=start + timedelta(minutes=2), labels=labels)

    first, same, longer = drift_check(deployment)

    assert set(first.columns) == {"text.chars", "text.words"} and not first.drifted
    assert not same.drifted and same.columns["text.words"]["reference"] == "first_window"
    assert longer.drifted and longer.drifted_share == 1.0
    assert longer.columns["text.words"]["distance"] > 1
    assert not longer.prediction_drift["drifted"]


def test_forecast_means_drift_against_the_first_window(org, make_deployment):
    deployment, version = make_deployment(org, recipe="timeseries-forecaster")
    start = timezone.now() - timedelta(hours=1)
    for minute, level in enumerate([10.0, 10.0, 14.0]):
        # The same spread in each window, so only the level can move.
        rng = np.random.default_rng(4)
        PredictionLog.objects.bulk_create(
            PredictionLog(
                organization=org,
                deployment=deployment,
                model_version=version,
                inputs={"series": [1, 2, 3]},
                output={"forecast": [float(v) for v in rng.normal(level, 1, 3)]},
                latency_ms=1.0,
                created_at=start + timedelta(minutes=minute, milliseconds=index),
            )
            for index in range(WINDOW)
        )

    first, same, moved = drift_check(deployment)

    assert first.prediction_drift["kind"] == "numeric" and not first.drifted
    assert same.prediction_drift["distance"] < 0.05  # 101 percentiles against 100 values
    assert not same.drifted
    assert moved.prediction_drift["distance"] > 2 and moved.drifted


def test_a_check_never_reads_another_organizations_rows(org, other_org, make_deployment):
    rng = np.random.default_rng(5)
    deployment, version = make_deployment(org, profile=tabular_profile(rng))
    start = timezone.now() - timedelta(hours=1)
    # Rows of another organization forged onto this deployment: drifted, and a full window.
    log(
        deployment,
        version,
        rows_from(rng, WINDOW, shift=5.0, cities=("z",)),
        start=start,
        organization=other_org,
    )
    # A training dataset version of the other organization forged into the lineage.
    foreign = DatasetVersionFactory(
        organization=other_org, profile={"x": numeric_profile(rng.normal(100, 1, 1000))}
    )
    foreign.created_at = timezone.now() + timedelta(days=1)  # newer than the real one
    foreign.save()
    version.trained_on.add(foreign)
    # And a live route to the other organization's model version.
    _other_deployment, other_version = make_deployment(other_org)
    Route.objects.create(
        organization=org, deployment=deployment, model_version=other_version, weight=0
    )
    log(deployment, other_version, rows_from(rng, WINDOW), start=start, organization=other_org)

    assert drift_check(deployment) == []

    log(deployment, version, rows_from(rng, WINDOW), start=start + timedelta(minutes=1))
    [report] = drift_check(deployment)
    assert report.model_version == version and not report.drifted
    assert report.columns["x"]["distance"] < 0.3  # against its own profile, not x ~ 100


def test_the_periodic_run_checks_recently_used_deployments_within_its_budget(
    org, other_org, make_deployment
):
    rng = np.random.default_rng(6)
    recent, recent_version = make_deployment(org, profile=tabular_profile(rng))
    stale, stale_version = make_deployment(other_org, profile=tabular_profile(rng))
    now = timezone.now()
    log(recent, recent_version, rows_from(rng, WINDOW), start=now - timedelta(minutes=5))
    log(stale, stale_version, rows_from(rng, WINDOW), start=now - timedelta(days=3))

    assert drift_check_recent(budget_s=60, now=now) == 1
    assert DriftReport.objects.get().deployment == recent
    assert drift_check_recent(budget_s=60, now=now) == 0


def test_a_huge_window_setting_is_capped(org, make_deployment, settings):
    settings.DRIFT_WINDOW_MAX_ROWS = WINDOW
    rng = np.random.default_rng(7)
    deployment, version = make_deployment(org, profile=tabular_profile(rng))
    Deployment.objects.filter(pk=deployment.pk).update(drift_window_rows=2_000_000_000)
    deployment.refresh_from_db()
    log(deployment, version, rows_from(rng, WINDOW), start=timezone.now() - timedelta(hours=1))

    [report] = drift_check(deployment)
    assert report.rows == WINDOW


def test_a_deployment_never_checked_goes_before_ones_checked_before(org, make_deployment):
    rng = np.random.default_rng(9)
    checked, checked_version = make_deployment(org, profile=tabular_profile(rng))
    fresh, fresh_version = make_deployment(org, profile=tabular_profile(rng))
    now = timezone.now()
    log(checked, checked_version, rows_from(rng, WINDOW), start=now - timedelta(minutes=9))
    drift_check(checked)
    log(checked, checked_version, rows_from(rng, WINDOW), start=now - timedelta(minutes=8))
    log(fresh, fresh_version, rows_from(rng, WINDOW), start=now - timedelta(minutes=7))

    # A budget spent by the first deployment: only that one is checked.
    assert drift_check_recent(budget_s=0, now=now) == 1
    assert DriftReport.objects.filter(deployment=fresh).count() == 1
    assert DriftReport.objects.filter(deployment=checked).count() == 1


@pytest.mark.django_db(transaction=True)
def test_two_checks_at_once_report_a_window_once(org, make_deployment):
    rng = np.random.default_rng(10)
    deployment, version = make_deployment(org, profile=tabular_profile(rng))
    log(deployment, version, rows_from(rng, WINDOW), start=timezone.now() - timedelta(hours=1))
    barrier = threading.Barrier(2)
    written = []

    def check():
        try:
            barrier.wait()
            written.append(len(drift_check(Deployment.objects.get(pk=deployment.pk))))
        finally:
            connection.close()

    threads = [threading.Thread(target=check) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert sorted(written) == [0, 1]
    assert DriftReport.objects.filter(deployment=deployment).count() == 1


def test_extreme_numbers_are_reported_not_a_database_error(org, make_deployment):
    deployment, version = make_deployment(org, recipe="timeseries-forecaster")
    start = timezone.now() - timedelta(hours=1)
    for minute in range(2):
        PredictionLog.objects.bulk_create(
            PredictionLog(
                organization=org,
                deployment=deployment,
                model_version=version,
                # Each finite, but their sums over a window are not.
                inputs={"history": [1.7e308]},
                output={"forecast": [1.7e308]},
                latency_ms=1.0,
                created_at=start + timedelta(minutes=minute, milliseconds=index),
            )
            for index in range(WINDOW)
        )

    first, second = drift_check(deployment)

    first.refresh_from_db()
    assert first.columns["history.level"]["window_profile"]["count"] == WINDOW
    assert first.columns["history.level"]["window_profile"]["mean"] is None
    assert first.prediction_drift["window_profile"]["mean"] is None
    second.refresh_from_db()
    assert second.rows == WINDOW


def test_beat_runs_the_check_through_a_registered_task(org, make_deployment):
    from django.conf import settings

    from factory_saas.celery import app
    from serving.monitoring_tasks import drift_check as drift_check_task

    app.loader.import_default_modules()
    entry = settings.CELERY_BEAT_SCHEDULE["serving-drift-check"]
    assert entry["task"] == drift_check_task.name == "serving.drift_check"
    assert entry["task"] in app.tasks

    rng = np.random.default_rng(12)
    deployment, version = make_deployment(org, profile=tabular_profile(rng))
    log(deployment, version, rows_from(rng, WINDOW), start=timezone.now() - timedelta(hours=1))
    assert drift_check_task.apply().get() == 1
