"""Serve jobs: the long-running replicas a deployment asks for (serving/ decides how many and of
which model version; jobs places, runs, bills and stops them like any job).

The replica's HTTP contract (the web is its only client):
- `POST http://{address}/predict` with `Authorization: Bearer {replica_token(job.pk, attempt)}`
  and JSON `{"inputs": [...]}` (at most ONLINE_PREDICTION_MAX_ROWS items) -> 200
  `{"outputs": [...]}`, one per input in order; 400 `{"detail": "..."}` for inputs the model cannot
  read (safe to show the tenant); 401 without the right token.
- `GET http://{address}/healthz` -> 200 `{"status": "ready", "in_flight": n}`.
- On stop: no new requests, the in-flight ones are answered, then the process exits.

Outputs per recipe: classifiers `{"label": str, "probabilities": {label: p}}`; the forecaster
`{"forecast": [float, ...]}`. Feedback labels: the class (classifiers), the actual values
(forecaster).
"""

from __future__ import annotations

import hashlib
import hmac

from django.conf import settings

from registry.models import ModelVersion
from tenants.actors import Actor
from tenants.models import Organization

from ..models import Job, ResourceClass


def replica_token(job_id: int, attempt: int) -> str:
    """The bearer token of one attempt of a serve job: derived, never stored, so the web and the
    worker agree on it and it dies with the attempt. The replica's child receives only this."""
    message = f"replica:{job_id}:{attempt}".encode()
    return hmac.new(settings.SECRET_KEY.encode(), message, hashlib.sha256).hexdigest()


def replica_job_submit(
    *,
    organization: Organization,
    model_version: ModelVersion,
    resource_class: ResourceClass,
    actor: Actor,
    labels: dict | None = None,
) -> Job:
    """Queue a serve job for `model_version` (of `organization`), admitted like any job."""
    raise NotImplementedError("jobs/services/replicas.py: replica_job_submit")


def replica_job_stop(*, job: Job, actor: Actor, reason: str) -> Job:
    """Drain and stop a serve job: its in-flight requests are answered first."""
    raise NotImplementedError("jobs/services/replicas.py: replica_job_stop")
