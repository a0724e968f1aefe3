"""Reads of the loop's rows: what a deployment's versions did over a window."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import Aggregate, Count, DateTimeField, F, FloatField, Func, Q, Value

from tenants.models import Organization

from .models import Deployment, PredictionLog, Route

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


class _Accumulator:
    """Latencies, errors and live-metric scores of some predictions, folded into VersionStats."""

    __slots__ = ("errors", "latency", "scores")

    def __init__(self):
        self.latency: list[float] = []
        self.errors = 0
        self.scores: list[float] = []

    def add(self, metric: str, latency: float, error: str, output, label) -> None:
        self.latency.append(latency)
        self.errors += bool(error)
        score = _score(metric, output, label)
        if score is not None:
            self.scores.append(score)

    def stats(self) -> VersionStats:
        latency = sorted(self.latency)
        scores = self.scores
        return VersionStats(
            requests=len(latency),
            errors=self.errors,
            p50_ms=_percentile(latency, 0.5),
            p99_ms=_percentile(latency, 0.99),
            labelled=len(scores),
            metric=sum(scores) / len(scores) if scores else None,
        )


def _logged(*, deployment: Deployment, since: datetime, until: datetime | None, mode: str):
    rows = PredictionLog.objects.for_organization(deployment.organization).filter(
        deployment=deployment, created_at__gte=since, mode=mode
    )
    if until is not None:
        rows = rows.filter(created_at__lt=until)
    return rows


def version_stats(
    *, deployment: Deployment, since: datetime, until: datetime | None = None, mode: str = "live"
) -> dict[int, VersionStats]:
    """Per model version id: requests, errors, latency percentiles and the live metric of the
    logged predictions of `deployment` made in [since, until)."""
    rows = _logged(deployment=deployment, since=since, until=until, mode=mode)
    metric, _higher = live_metric_of(deployment.recipe)
    by_version: dict[int, _Accumulator] = {}
    for version_id, latency, error, output, label in rows.values_list(
        "model_version_id", "latency_ms", "error", "output", "label"
    ).iterator(chunk_size=5000):
        by_version.setdefault(version_id, _Accumulator()).add(metric, latency, error, output, label)
    return {version_id: acc.stats() for version_id, acc in by_version.items()}


@dataclass(frozen=True)
class VersionSeries:
    """version_stats of equal consecutive windows: `starts[i]` opens window i, which lasts
    `window`; `stats[version_id][i]` is None where the version answered nothing in it."""

    starts: list[datetime]
    window: timedelta
    stats: dict[int, list[VersionStats | None]]


class _Percentile(Aggregate):
    """PostgreSQL's nearest-rank percentile, the same rank `_percentile` takes in Python."""

    function = "percentile_disc"
    template = "%(function)s(%(share)s) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()

    def __init__(self, expression, *, share: float):
        super().__init__(expression, share=float(share))


def version_series(
    *, deployment: Deployment, start: datetime, end: datetime, windows: int, mode: str = "live"
) -> VersionSeries:
    """version_stats over each of `windows` equal windows from `start` to `end`, in two queries
    whatever the traffic: the database counts and ranks latencies per version and window; only
    labelled predictions (the live metric's rows) come back to be scored."""
    window = (end - start) / windows
    starts = [start + window * index for index in range(windows)]
    rows = _logged(deployment=deployment, since=start, until=end, mode=mode)
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
        .annotate(
            requests=Count("pk"),
            errors=Count("pk", filter=~Q(error="")),
            p50_ms=_Percentile("latency_ms", share=0.5),
            p99_ms=_Percentile("latency_ms", share=0.99),
        )
        .order_by()
    )

    def index(at: datetime) -> int:
        return min(windows - 1, int((at - start) / window))

    metric, _higher = live_metric_of(deployment.recipe)
    scores: dict[tuple[int, int], list[float]] = {}
    for version_id, created_at, output, label in (
        rows.filter(label__isnull=False)
        .values_list("model_version_id", "created_at", "output", "label")
        .iterator(chunk_size=5000)
    ):
        score = _score(metric, output, label)
        if score is not None:
            scores.setdefault((version_id, index(created_at)), []).append(score)

    stats: dict[int, list[VersionStats | None]] = {}
    for row in counted:
        cell = (row["model_version_id"], index(row["opened"]))
        scored = scores.get(cell, [])
        stats.setdefault(cell[0], [None] * windows)[cell[1]] = VersionStats(
            requests=row["requests"],
            errors=row["errors"],
            p50_ms=row["p50_ms"],
            p99_ms=row["p99_ms"],
            labelled=len(scored),
            metric=sum(scored) / len(scored) if scored else None,
        )
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
    aggregated by the database in one query, for a list of every deployment."""
    rows = (
        PredictionLog.objects.for_organization(organization)
        .filter(created_at__gte=since, mode=Route.Mode.LIVE)
        .values("deployment_id")
        .annotate(
            requests=Count("pk"),
            errors=Count("pk", filter=~Q(error="")),
            p99_ms=_Percentile("latency_ms", share=0.99),
        )
        .order_by()
    )
    return {
        row["deployment_id"]: DeploymentTraffic(row["requests"], row["errors"], row["p99_ms"])
        for row in rows
    }


def live_routes(deployment: Deployment) -> list[Route]:
    return list(
        Route.objects.for_organization(deployment.organization).filter(
            deployment=deployment, mode=Route.Mode.LIVE
        )
    )
