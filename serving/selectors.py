"""Reads of the loop's rows: what a deployment's versions did over a window."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from django.db import connection
from django.db.models import Aggregate, Count, FloatField, Q, QuerySet

from .models import Deployment, LoopEvent, PredictionLog, Replica, Route

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


class _PercentileDisc(Aggregate):
    """PostgreSQL's nearest-rank percentile, the same as `_percentile` in Python."""

    function = "percentile_disc"
    template = "%(function)s(%(share)s) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()

    def __init__(self, expression, share: float):
        super().__init__(expression, share=share)


def _latency_and_errors(rows) -> dict[int, tuple[int, int, float | None, float | None]]:
    """Per version: requests, errors, p50 and p99, counted by the database where it can, so a
    window of millions of predictions is never loaded into the web process."""
    if connection.vendor == "postgresql":
        return {
            r["model_version_id"]: (r["requests"], r["errors"], r["p50"], r["p99"])
            for r in rows.order_by()
            .values("model_version_id")
            .annotate(
                requests=Count("pk"),
                errors=Count("pk", filter=~Q(error="")),
                p50=_PercentileDisc("latency_ms", 0.5),
                p99=_PercentileDisc("latency_ms", 0.99),
            )
        }
    by_version: dict[int, list] = {}
    for version_id, latency, error in rows.values_list(
        "model_version_id", "latency_ms", "error"
    ).iterator(chunk_size=5000):
        acc = by_version.setdefault(version_id, [[], 0])
        acc[0].append(latency)
        acc[1] += bool(error)
    return {
        version_id: (
            len(latency),
            errors,
            _percentile(sorted(latency), 0.5),
            _percentile(sorted(latency), 0.99),
        )
        for version_id, (latency, errors) in by_version.items()
    }


def version_stats(
    *, deployment: Deployment, since: datetime, until: datetime | None = None, mode: str = "live"
) -> dict[int, VersionStats]:
    """Per model version id: requests, errors, latency percentiles and the live metric of the
    logged predictions of `deployment` made in [since, until). Only labelled rows are read into
    Python (to score them); the rest is aggregated by the database."""
    rows = PredictionLog.objects.for_organization(deployment.organization).filter(
        deployment=deployment, created_at__gte=since, mode=mode
    )
    if until is not None:
        rows = rows.filter(created_at__lt=until)
    metric, _higher = live_metric_of(deployment.recipe)
    scores: dict[int, list[float]] = {}
    for version_id, output, label in (
        rows.filter(label__isnull=False)
        .values_list("model_version_id", "output", "label")
        .iterator(chunk_size=5000)
    ):
        score = _score(metric, output, label)
        if score is not None:
            scores.setdefault(version_id, []).append(score)
    stats = {}
    for version_id, (requests, errors, p50, p99) in _latency_and_errors(rows).items():
        scored = scores.get(version_id, [])
        stats[version_id] = VersionStats(
            requests=requests,
            errors=errors,
            p50_ms=p50,
            p99_ms=p99,
            labelled=len(scored),
            metric=sum(scored) / len(scored) if scored else None,
        )
    return stats


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
