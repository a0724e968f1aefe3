"""Prediction latency for Prometheus, recorded by the web process that forwards each request.

One series per deployment (and outcome): deployments are a paid, rate-limited resource an
organization holds a handful of, so the label stays bounded by what tenants pay for.
"""

from prometheus_client import Histogram

PREDICTION_SECONDS = Histogram(
    "factory_prediction_latency_seconds",
    "Time a forward to a replica took, as the web saw it, per deployment; outcome is ok or the "
    "error's code.",
    ["organization", "deployment", "mode", "outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)


def prediction_observed(*, deployment, mode: str, outcome: str, seconds: float) -> None:
    PREDICTION_SECONDS.labels(deployment.organization.slug, deployment.name, mode, outcome).observe(
        seconds
    )
