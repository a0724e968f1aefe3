"""Reads of the loop's rows: what a deployment's versions did over a window.

Counts and latency percentiles are the database's work on PostgreSQL (percentile_disc, date_bin),
so a window of millions of predictions never comes into the web process; the embedded default's
SQLite has neither, and there the same numbers are folded in Python. Only labelled predictions
(the live metric's rows) are read to be scored, everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import connection
from django.db.models import (
    Aggregate,
    Count,
    DateTimeField,
    F,
    FloatField,
    Func,
    Q,
    QuerySet,
    Value,
)

from tenants.models import Organization

from .models import Deployment, LoopEvent, PredictionLog, Replica, Retrain, Route

# The live metric each recipe is judged on, and whether higher is better. Classifiers: the share
# of labelled predictions whose label was right; the forecaster: the mean absolute error of its
# forecasts against the actual values fed back.
LIVE_METRICS: dict[str, tuple[str, bool]] = {
    "tabular-classifier": ("accuracy", True),
    "image-classifier": ("accuracy", True),
    "text-classifier": ("accuracy", True),
    "timeseries-forecaster": ("mae", False),
}


@dataclass(frozen=True)
class VersionStats:
    requests: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None
    labelled: int
    metric: float | None  # LIVE_METRICS[recipe] over the labelled predictions

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


def live_metric_of(recipe: str) -> tuple[str, bool]:
    return LIVE_METRICS.get(recipe, ("accuracy", True))


def _percentile(values: list[float], share: float) -> float | None:
    """The nearest-rank percentile of sorted `values`."""
    if not values:
        return None
    return values[min(len(values) - 1, max(0, math.ceil(share * len(values)) - 1))]


def _score(metric: str, output, label) -> float | None:
    """One labelled prediction's contribution: 1/0 for accuracy, the absolute error for MAE."""
    if output is None or label is None:
        return None
    if metric == "accuracy":
        return float(isinstance(output, dict) and output.get("label") == label)
    forecast = output.get("forecast") if isinstance(output, dict) else None
    if not isinstance(forecast, list) or not isinstance(label, list) or not label:
        return None
    pairs = list(zip(forecast, label, strict=False))
    try:
        return sum(abs(float(f) - float(a)) for f, a in pairs) / len(pairs)
    except (TypeError, ValueError):
        return None


class _Percentile(Aggregate):
    """PostgreSQL's nearest-rank percentile, the same rank `_percentile` takes in Python."""

    function = "percentile_disc"
    template = "%(function)s(%(share)s) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()

    def __init__(self, expression, *, share: float):
        super().__init__(expression, share=float(share))


_COUNTS = {
    "requests": Count("pk"),
    "errors": Count("pk", filter=~Q(error="")),
    "p50_ms": _Percentile("latency_ms", share=0.5),
    "p99_ms": _Percentile("latency_ms", share=0.99),
}


def _logged(*, deployment: Deployment, since: datetime, until: datetime | None, mode: str):
    rows = PredictionLog.objects.for_organization(deployment.organization).filter(
        deployment=deployment, created_at__gte=since, mode=mode
    )
    if until is not None:
        rows = rows.filter(created_at__lt=until)
    return rows


def _counted(rows, group: str) -> dict[Hashable, dict]:
    """Per value of `group`: requests, errors, p50_ms and p99_ms of `rows`."""
    if connection.vendor == "postgresql":
        return {row.pop(group): row for row in rows.values(group).annotate(**_COUNTS).order_by()}
    folded: dict[Hashable, tuple[list[float], list[int]]] = {}
    for key, latency, error in rows.values_list(group, "latency_ms", "error").iterator(
        chunk_size=5000
    ):
        latencies, errors = folded.setdefault(key, ([], [0]))
        latencies.append(latency)
        errors[0] += bool(error)
    counted = {}
    for key, (latencies, errors) in folded.items():
        latencies.sort()
        counted[key] = {
            "requests": len(latencies),
            "errors": errors[0],
            "p50_ms": _percentile(latencies, 0.5),
            "p99_ms": _percentile(latencies, 0.99),
        }
    return counted


def _scores(rows, recipe: str, key: Callable[[int, datetime], Hashable]) -> dict:
    """The live metric's per-prediction scores of the labelled `rows`, grouped by
    `key(version_id, created_at)`."""
    metric, _higher = live_metric_of(recipe)
    scores: dict[Hashable, list[float]] = {}
    for version_id, created_at, output, label in (
        rows.filter(label__isnull=False)
        .values_list("model_version_id", "created_at", "output", "label")
        .iterator(chunk_size=5000)
    ):
        score = _score(metric, output, label)
        if score is not None:
            scores.setdefault(key(version_id, created_at), []).append(score)
    return scores


def _stats(counts: dict, scored: list[float]) -> VersionStats:
    return VersionStats(
        requests=counts["requests"],
        errors=counts["errors"],
        p50_ms=counts["p50_ms"],
        p99_ms=counts["p99_ms"],
        labelled=len(scored),
        metric=sum(scored) / len(scored) if scored else None,
    )


def version_stats(
    *, deployment: Deployment, since: datetime, until: datetime | None = None, mode: str = "live"
) -> dict[int, VersionStats]:
    """Per model version id: requests, errors, latency percentiles and the live metric of the
    logged predictions of `deployment` made in [since, until)."""
    rows = _logged(deployment=deployment, since=since, until=until, mode=mode)
    scores = _scores(rows, deployment.recipe, lambda version_id, _at: version_id)
    return {
        version_id: _stats(counts, scores.get(version_id, []))
        for version_id, counts in _counted(rows, "model_version_id").items()
    }


@dataclass(frozen=True)
class VersionSeries:
    """version_stats of equal consecutive windows: `starts[i]` opens window i, which lasts
    `window`; `stats[version_id][i]` is None where the version answered nothing in it."""

    starts: list[datetime]
    window: timedelta
    stats: dict[int, list[VersionStats | None]]


def version_series(
    *, deployment: Deployment, start: datetime, end: datetime, windows: int, mode: str = "live"
) -> VersionSeries:
    """version_stats over each of `windows` equal windows from `start` to `end`; on PostgreSQL in
    two queries whatever the traffic (the database bins, counts and ranks latencies), elsewhere
    one version_stats per window."""
    window = (end - start) / windows
    starts = [start + window * index for index in range(windows)]
    stats: dict[int, list[VersionStats | None]] = {}
    if connection.vendor != "postgresql":
        for index, opened in enumerate(starts):
            for version_id, cell in version_stats(
                deployment=deployment, since=opened, until=opened + window, mode=mode
            ).items():
                stats.setdefault(version_id, [None] * windows)[index] = cell
        return VersionSeries(starts=starts, window=window, stats=stats)

    def index(at: datetime) -> int:
        return min(windows - 1, int((at - start) / window))

    rows = _logged(deployment=deployment, since=start, until=end, mode=mode)
    scores = _scores(rows, deployment.recipe, lambda version_id, at: (version_id, index(at)))
    opened = Func(
        Value(window),
        F("created_at"),
        Value(start),
        function="date_bin",
        output_field=DateTimeField(),
    )
    counted = (
        rows.annotate(opened=opened)
        .values("model_version_id", "opened")
        .annotate(**_COUNTS)
        .order_by()
    )
    for row in counted:
        cell = (row["model_version_id"], index(row["opened"]))
        stats.setdefault(cell[0], [None] * windows)[cell[1]] = _stats(row, scores.get(cell, []))
    return VersionSeries(starts=starts, window=window, stats=stats)


@dataclass(frozen=True)
class DeploymentTraffic:
    requests: int
    errors: int
    p99_ms: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


def deployment_traffic(
    *, organization: Organization, since: datetime
) -> dict[int, DeploymentTraffic]:
    """Per deployment id of `organization`: its live requests since `since`, errors and p99,
    for a list of every deployment."""
    rows = PredictionLog.objects.for_organization(organization).filter(
        created_at__gte=since, mode=Route.Mode.LIVE
    )
    return {
        deployment_id: DeploymentTraffic(row["requests"], row["errors"], row["p99_ms"])
        for deployment_id, row in _counted(rows, "deployment_id").items()
    }


def live_routes(deployment: Deployment) -> list[Route]:
    return list(
        Route.objects.for_organization(deployment.organization).filter(
            deployment=deployment, mode=Route.Mode.LIVE
        )
    )


def replica_list(*, deployment: Deployment) -> QuerySet[Replica]:
    return Replica.objects.for_organization(deployment.organization).filter(deployment=deployment)


def timeline_list(*, deployment: Deployment) -> QuerySet[LoopEvent]:
    return LoopEvent.objects.for_organization(deployment.organization).filter(deployment=deployment)


def retrain_list(*, organization: Organization, deployment: Deployment | None = None):
    """Retrains, newest first, with what their rows show (versions, jobs, the model card)."""
    rows = (
        Retrain.objects.for_organization(organization)
        .filter(deployment__deleted_at__isnull=True)
        .select_related(
            "deployment",
            "champion__registered_model",
            "challenger__registered_model",
            "job",
            "evaluation_job",
            "model_card",
        )
    )
    return rows if deployment is None else rows.filter(deployment=deployment)
