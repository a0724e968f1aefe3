"""version_stats: the database's aggregates agree with the nearest-rank definition in Python."""

from datetime import timedelta

from django.utils import timezone

from serving.models import PredictionLog
from serving.selectors import _percentile, version_stats


def test_version_stats_count_errors_percentiles_and_the_metric_per_version(org, make_deployment):
    deployment, (a, b) = make_deployment(org, weights=(50, 50))
    latencies = [float(n) for n in range(1, 101)]
    for i, latency in enumerate(latencies):
        PredictionLog.objects.create(
            organization=org,
            deployment=deployment,
            model_version=a,
            inputs={},
            output={"label": "yes"} if i % 10 else None,
            error="" if i % 10 else "replica_error",
            latency_ms=latency,
            label=("yes" if i < 30 else "no") if i % 10 and i < 40 else None,
        )
    PredictionLog.objects.create(
        organization=org,
        deployment=deployment,
        model_version=b,
        inputs={},
        output={"label": "no"},
        latency_ms=7.0,
        mode="shadow",
    )
    stats = version_stats(deployment=deployment, since=timezone.now() - timedelta(hours=1))
    assert set(stats) == {a.pk}
    row = stats[a.pk]
    assert (row.requests, row.errors) == (100, 10)
    assert (row.p50_ms, row.p99_ms) == (_percentile(latencies, 0.5), _percentile(latencies, 0.99))
    assert row.labelled == 36  # 40 labelled minus the 4 errors among them
    assert row.metric == 27 / 36
    shadow = version_stats(
        deployment=deployment, since=timezone.now() - timedelta(hours=1), mode="shadow"
    )
    assert shadow[b.pk].requests == 1 and shadow[b.pk].p99_ms == 7.0
