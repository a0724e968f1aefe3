"""Drift monitoring over the prediction log: cut each live model version's logged predictions
into windows, compare each window with the version's training data (serving.drift does the
arithmetic), and store one DriftReport per window; a drifted window goes on the timeline.

What is compared, per recipe:
- tabular-classifier: every input column of the model (its input signature, else the training
  profile's columns, minus the target) against the training dataset version's profile.
- image-, text-classifier and timeseries-forecaster: a few numbers read from each input
  (serving.drift.INPUT_FEATURES: text length and words, series length, level and scale, image
  bytes, width and height) against the same numbers of the version's first window, since the
  training profile of images, texts and series holds nothing comparable.
- Predictions, every recipe: a classifier's labels against the training label distribution when
  the training profile has the target column (an image zip's classes), otherwise against the
  version's first window; a forecaster's per-request forecast means against its first window.
  Errored requests (no output) are left out of prediction drift; the error rate is the
  rollout's to watch.

A report drifts when its inputs did (the share of drifted columns reached the deployment's
share threshold) or its predictions did (their distance reached the column threshold): for
images, texts and series the predictions are the stronger signal, and a model whose answers
moved is worth a retrain's look whatever its inputs say. The first window of a version without a
training reference is its own baseline and never drifts.

A window is the next `drift_window_rows` live predictions (errors included: their inputs are what
callers sent) after the previous report's `window_end`, extended to every row sharing the last
row's timestamp (one request's inputs share it), so a window boundary never splits rows and no
row is reported twice. Only rows older than DRIFT_SETTLE_S are read, so a request still being
logged when a window closes is not left behind it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, Max
from django.utils import timezone

from registry.models import DatasetVersion, ModelVersion
from tenants.actors import Actor
from tenants.services import audit_record

from . import drift
from .models import Deployment, DriftReport, LoopEvent, PredictionLog, Route
from .timeline import deployment_event_publish

logger = logging.getLogger(__name__)
SYSTEM = Actor()
CLASSIFIERS = {"tabular-classifier", "image-classifier", "text-classifier"}
FORECASTERS = {"timeseries-forecaster"}
INPUT_DRIFT_RECIPES = {"tabular-classifier"}
# pg_advisory_xact_lock(namespace, deployment): "dr".
DRIFT_LOCK_NAMESPACE = 0x6472


def drift_check(deployment: Deployment) -> list[DriftReport]:
    """Report every full window of each live version of `deployment` not reported yet, at most
    DRIFT_MAX_WINDOWS_PER_CHECK per version (a backlog is worked off over later checks)."""
    organization = deployment.organization
    version_ids = (
        Route.objects.for_organization(organization)
        .filter(deployment=deployment, mode=Route.Mode.LIVE)
        .values_list("model_version_id", flat=True)
    )
    versions = ModelVersion.objects.for_organization(organization).filter(pk__in=list(version_ids))
    reports = []
    for version in versions.order_by("pk"):
        for _ in range(settings.DRIFT_MAX_WINDOWS_PER_CHECK):
            report = _report_next_window(deployment, version)
            if report is None:
                break
            reports.append(report)
    return reports


def drift_check_recent(*, budget_s: float, now: datetime | None = None) -> int:
    """Check every deployment that answered a request in the last DRIFT_RECENT_S, those checked
    longest ago first, until `budget_s` is spent (one at least, so each run makes progress); the
    rest wait for the next run. Returns the number of reports written."""
    now = now or timezone.now()
    since = now - timedelta(seconds=settings.DRIFT_RECENT_S)
    # System-wide on purpose: this picks which deployments to check; each check reads only its
    # own organization's rows. The request path keeps last_request_at, so picking them costs no
    # read of the (large) prediction log.
    deployments = (
        Deployment.objects.filter(last_request_at__gte=since)
        .annotate(last_report=Max("drift_reports__created_at"))
        .order_by(F("last_report").asc(nulls_first=True), "pk")
        .select_related("organization")
    )
    started = time.monotonic()
    written = 0
    for deployment in deployments:
        try:
            written += len(drift_check(deployment))
        except Exception:
            # One deployment's failure (a bug its data exposes) must not stop every other
            # organization's checks; it is logged, and retried next run.
            logger.exception("Drift check of deployment %s failed", deployment.pk)
        if time.monotonic() - started >= budget_s:
            break
    return written


def reference_profile(version: ModelVersion) -> dict:
    """The profile of the newest dataset version `version` was trained on ({} without one)."""
    dataset_version = (
        DatasetVersion.objects.for_organization(version.organization)
        .filter(trained_models=version, state=DatasetVersion.State.READY)
        .order_by("-created_at", "-pk")
        .first()
    )
    profile = dataset_version.profile if dataset_version is not None else {}
    return profile if isinstance(profile, dict) else {}


def _report_next_window(deployment: Deployment, version: ModelVersion) -> DriftReport | None:
    organization = deployment.organization
    with transaction.atomic():
        _lock(deployment)
        reports = DriftReport.objects.for_organization(organization).filter(
            deployment=deployment, model_version=version
        )
        previous_end = reports.aggregate(end=Max("window_end"))["end"]
        rows = _window(deployment, version, after=previous_end)
        if rows is None:
            return None
        report = _compare(deployment, version, rows, reports=reports)
        report.columns = json_safe(report.columns)
        report.prediction_drift = json_safe(report.prediction_drift)
        report.save()
        if report.drifted:
            _record_drift(report)
        return report


def json_safe(value):
    """`value` with every non-finite float replaced by None: PostgreSQL's JSON has no NaN or
    infinity, and a window of extreme values can make them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def _lock(deployment: Deployment) -> None:
    """One checker per deployment at a time, so two runs never report the same window. An
    advisory lock, not the deployment's row: the request path writes that row, and must not wait
    for a window to be compared."""
    if connection.vendor != "postgresql":
        return  # SQLite (embedded): its transactions already run one at a time
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_advisory_xact_lock(%s, %s)", [DRIFT_LOCK_NAMESPACE, deployment.pk % 2**31]
        )


def _window_rows(deployment: Deployment) -> int:
    return max(
        settings.DRIFT_WINDOW_MIN_ROWS,
        min(deployment.drift_window_rows, settings.DRIFT_WINDOW_MAX_ROWS),
    )


def _window(
    deployment: Deployment, version: ModelVersion, *, after: datetime | None
) -> list[tuple] | None:
    """(created_at, inputs, output) of the next full window, or None while it is not full."""
    settled = timezone.now() - timedelta(seconds=settings.DRIFT_SETTLE_S)
    logged = PredictionLog.objects.for_organization(deployment.organization).filter(
        deployment=deployment, model_version=version, mode=Route.Mode.LIVE, created_at__lt=settled
    )
    if after is not None:
        logged = logged.filter(created_at__gt=after)
    size = _window_rows(deployment)
    # By time alone, which the (deployment, version, time) index gives without a sort: rows that
    # share the boundary's time all join the window anyway.
    last = logged.order_by("created_at").values_list("created_at", flat=True)[size - 1 : size]
    end = next(iter(last), None)
    if end is None:
        return None
    return list(
        logged.filter(created_at__lte=end)
        .order_by("created_at", "pk")
        .values_list("created_at", "inputs", "output")
    )


def _compare(
    deployment: Deployment, version: ModelVersion, rows: list[tuple], *, reports
) -> DriftReport:
    profile = reference_profile(version)
    inputs = [row_inputs for _at, row_inputs, _output in rows]
    outputs = [output for _at, _inputs, output in rows]
    window = drift.WindowDrift()
    if deployment.recipe in INPUT_DRIFT_RECIPES:
        window = drift.compare_window(
            _input_reference(version, profile),
            inputs,
            column_threshold=deployment.drift_column_threshold,
            share_threshold=deployment.drift_share_threshold,
        )
    elif deployment.recipe in drift.INPUT_FEATURES:
        window = _feature_drift(deployment, inputs, baseline=_feature_baseline(reports))
    prediction = _prediction_drift(
        deployment, version, profile, outputs, baseline=_baseline(reports)
    )
    return DriftReport(
        organization=deployment.organization,
        deployment=deployment,
        model_version=version,
        window_start=rows[0][0],
        window_end=rows[-1][0],
        rows=len(rows),
        drifted=window.drifted or bool(prediction.get("drifted")),
        drifted_share=window.drifted_share,
        columns=window.columns,
        prediction_drift=prediction,
    )


def _feature_drift(deployment: Deployment, inputs: list, *, baseline: dict | None):
    """Inputs read as a few numbers each, against the version's first window's numbers; each
    column keeps its window's profile, the baseline of later windows."""
    names, features = drift.input_features(deployment.recipe, inputs)
    profiles = {name: drift.numeric_profile(drift.column_values(features, name)) for name in names}
    if baseline is None:
        columns = {
            name: {
                "kind": "numeric",
                "reference": "this_window",
                "distance": None,
                "drifted": False,
                "window_profile": profiles[name],
            }
            for name in names
        }
        return drift.WindowDrift(columns=columns)
    window = drift.compare_window(
        {name: baseline[name] for name in names if name in baseline},
        features,
        column_threshold=deployment.drift_column_threshold,
        share_threshold=deployment.drift_share_threshold,
    )
    for name, column in window.columns.items():
        column.update(reference="first_window", window_profile=profiles[name])
    return window


def _feature_baseline(reports) -> dict | None:
    """The input-feature profiles of the version's first window that had any usable ones."""
    for columns in reports.order_by("window_end", "pk").values_list("columns", flat=True):
        if not isinstance(columns, dict):
            continue
        profiles = {
            name: column.get("window_profile")
            for name, column in columns.items()
            if isinstance(column, dict)
            and drift.column_kind(column.get("window_profile")) is not None
        }
        if profiles:
            return profiles
    return None


def _target(version: ModelVersion) -> str | None:
    signature = version.input_signature if isinstance(version.input_signature, dict) else {}
    parameters = version.parameters if isinstance(version.parameters, dict) else {}
    target = signature.get("target") or parameters.get("target")
    return target if isinstance(target, str) else None


def _input_reference(version: ModelVersion, profile: dict) -> dict:
    """The training profile's entries of the model's input columns."""
    signature = version.input_signature if isinstance(version.input_signature, dict) else {}
    listed = signature.get("columns")
    if isinstance(listed, list) and listed:
        names = [column.get("name") for column in listed if isinstance(column, dict)]
    else:
        names = [name for name in profile if name != _target(version)]
    return {name: profile[name] for name in names if isinstance(name, str) and name in profile}


def _label_reference(version: ModelVersion, profile: dict) -> dict | None:
    if "classes" in profile and isinstance(profile["classes"], dict):
        classes = profile["classes"]
        return {
            "count": sum(classes.values()),
            "nulls": 0,
            "top": [[label, count] for label, count in classes.items()],
        }
    target = _target(version)
    column = profile.get(target) if target else None
    return column if drift.column_kind(column) == "categorical" else None


def _prediction_values(recipe: str, outputs: Sequence) -> tuple[str, list] | None:
    if recipe in CLASSIFIERS:
        return "categorical", [o.get("label") if isinstance(o, dict) else None for o in outputs]
    if recipe in FORECASTERS:
        return "numeric", [_forecast_mean(output) for output in outputs]
    return None


def _forecast_mean(output) -> float | None:
    forecast = output.get("forecast") if isinstance(output, dict) else None
    if not isinstance(forecast, list) or not forecast:
        return None
    numbers = [drift.as_number(value) for value in forecast]
    if any(number is None for number in numbers):
        return None
    return sum(numbers) / len(numbers)


def _baseline(reports) -> dict | None:
    """The prediction profile of the version's first window that had predictions: the reference
    of later windows when the training data has none."""
    for recorded in reports.order_by("window_end", "pk").values_list("prediction_drift", flat=True):
        profile = recorded.get("window_profile") if isinstance(recorded, dict) else None
        if drift.column_kind(profile) is not None:
            return profile
    return None


def _prediction_drift(
    deployment: Deployment,
    version: ModelVersion,
    profile: dict,
    outputs: Sequence,
    *,
    baseline: dict | None,
) -> dict:
    """Errored requests have no output and are left out: the error rate is watched elsewhere."""
    read = _prediction_values(deployment.recipe, [o for o in outputs if o is not None])
    if read is None:
        return {}
    kind, values = read
    if kind == "categorical":
        window_profile = drift.categorical_profile(values)
        reference, source = _label_reference(version, profile), "training"
    else:
        window_profile = drift.numeric_profile(values)
        reference, source = None, "first_window"
    if reference is None:
        reference, source = baseline, "first_window"
    result: dict = {"kind": kind, "reference": source, "window_profile": window_profile}
    if not values:
        return {**result, "distance": None, "drifted": False}
    if reference is None or drift.column_kind(reference) != kind:
        # The first window with predictions is its own baseline: nothing to compare yet.
        return {**result, "reference": "this_window", "distance": None, "drifted": False}
    compared = drift.compare_column(reference, values, threshold=deployment.drift_column_threshold)
    return {**compared, **result}


def _record_drift(report: DriftReport) -> None:
    drifted = [name for name, column in report.columns.items() if column.get("drifted")]
    prediction = report.prediction_drift or {}
    parts = []
    if report.columns:
        parts.append(f"{len(drifted)} of {len(report.columns)} input columns drifted")
    if prediction.get("drifted"):
        distance = prediction.get("distance")
        parts.append("predictions drifted" + (f" ({distance:.3f})" if distance is not None else ""))
    data = {
        "drift_report": report.pk,
        "drifted_share": report.drifted_share,
        "drifted_columns": drifted,
        "prediction_distance": prediction.get("distance"),
        "rows": report.rows,
    }
    LoopEvent.objects.create(
        organization=report.organization,
        deployment=report.deployment,
        kind=LoopEvent.Kind.DRIFT_DETECTED,
        model_version=report.model_version,
        message=f"Drift in the window of {report.rows} predictions of {report.model_version}: "
        + "; ".join(parts)
        + ".",
        data=data,
    )
    audit_record(
        organization=report.organization,
        actor=SYSTEM,
        action="serving.drift_detected",
        target=report.deployment,
        data=data,
    )
    deployment_event_publish(
        deployment=report.deployment,
        type="deployment.drift_detected",
        data={"model_version_id": report.model_version_id, **data},
    )
