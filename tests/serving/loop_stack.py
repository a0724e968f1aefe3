"""The factory loop on the real stack, shared by tests/serving/test_loop_real_stack.py and
bench/loop.py: a small world of points whose rule and inputs can shift, datasets of it, a
champion trained by a real job, a deployment with a retrain policy, and traffic through the
predict API. Periods are short (LOOP_TIMINGS, read by the pool's processes at start)."""

from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass
from pathlib import Path

from jobs.models import TERMINAL_STATES, Job, JobState, ResourceClass
from jobs.services import JobOptions, training_job_submit
from registry.models import Dataset, DatasetVersion, ModelVersion
from registry.services import dataset_version_create
from serving import gateway
from serving.models import Deployment, PredictionLog, Retrain, Route
from serving.services import routes_set
from tenants.actors import Actor
from tests.processes import descendants

# What beat and the default worker run on: every periodic step of the loop at a fraction of a
# second, windows of 200 rows, bakes judged on 10 requests, serving billed every second.
LOOP_TIMINGS = {
    "SERVING_RECONCILE_S": "0.5",
    "DRIFT_CHECK_EVERY_S": "0.5",
    "DRIFT_SETTLE_S": "0",
    "DRIFT_WINDOW_MIN_ROWS": "50",
    "SERVING_LOOP_TICK_S": "0.5",
    "SERVING_LOOP_MIN_SAMPLES": "10",
    "SERVE_BILLING_INTERVAL_S": "1",
}
WINDOW_ROWS = 200
MIN_SAMPLES = 10
PARAMETERS = {"target": "label", "epochs": 4, "learning_rate": 0.05}


def world(rows: int, *, seed: int, shifted: bool = False, shuffled: bool = False) -> list[dict]:
    """Labelled points. The old world: a, b in [-1, 1], "yes" when a + b > 0. The shifted world:
    a and b moved up by 2 (two columns of three drift, over the monitor's share of 0.5) and "yes"
    when b - 2 > 0 (the rule changed too, so a model of the old world answers "yes" to nearly
    everything there). `shuffled` deals the labels at random
    over the rows: data nothing can learn from."""
    rng = random.Random(seed)  # noqa: S311  test data, not security
    points = []
    for _ in range(rows):
        a, b = rng.uniform(-1, 1), rng.uniform(-1, 1)
        positive = b > 0 if shifted else a + b > 0
        points.append(
            {
                "a": round(a + (2 if shifted else 0), 4),
                "b": round(b + (2 if shifted else 0), 4),
                "colour": rng.choice(["red", "blue"]),
                "label": "yes" if positive else "no",
            }
        )
    if shuffled:
        labels = [point["label"] for point in points]
        rng.shuffle(labels)
        for point, label in zip(points, labels, strict=True):
            point["label"] = label
    return points


def inputs_of(points: list[dict]) -> list[dict]:
    return [{k: v for k, v in point.items() if k != "label"} for point in points]


def dataset_add(dataset: Dataset, points: list[dict], folder: Path, *, actor: Actor):
    path = folder / f"{dataset.name}-{len(list(folder.glob('*.csv')))}.csv"
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=["a", "b", "colour", "label"])
        writer.writeheader()
        writer.writerows(points)
    return dataset_version_create(dataset=dataset, path=path, filename=path.name, actor=actor)


def finished(job: Job) -> bool:
    job.refresh_from_db()
    return job.state in TERMINAL_STATES


def train(organization, data: DatasetVersion, *, actor: Actor, wait_for) -> ModelVersion:
    """A champion trained by a real training job on the pool."""
    job, _ = training_job_submit(
        organization=organization,
        actor=actor,
        recipe="tabular-classifier",
        parameters=PARAMETERS,
        dataset_version=data,
        options=JobOptions(resource_class=ResourceClass.objects.get(name="cpu"), max_runtime_s=600),
        output_model_name="points",
    )
    wait_for(lambda: finished(job), timeout=180, what="the champion's training job")
    assert job.state == JobState.SUCCEEDED, job.failure_reason
    return job.output_model_version


def deploy(organization, version: ModelVersion, *, actor: Actor) -> Deployment:
    """A deployment of `version` at 100%, one replica at least per routed version, every
    prediction logged."""
    deployment = Deployment.objects.create(
        organization=organization,
        name="points",
        recipe="tabular-classifier",
        resource_class=ResourceClass.objects.get(name="cpu"),
        min_replicas=1,
        max_replicas=1,
        drift_window_rows=WINDOW_ROWS,
        created_by=actor.user,
    )
    routes_set(
        deployment=deployment,
        routes=[{"model_version": version.pk, "weight": 100, "mode": "live"}],
        actor=actor,
    )
    return deployment


def url(deployment: Deployment, action: str = "predict") -> str:
    return f"/api/v1/orgs/{deployment.organization.slug}/deployments/{deployment.name}/{action}/"


def routing_key_to(deployment: Deployment, version: ModelVersion) -> str:
    """A routing key whose bucket lands on `version`'s live route as the routes stand now."""
    routes = list(Route.objects.filter(deployment=deployment))
    for n in range(1000):
        key = f"caller-{n}"
        if gateway.route_pick(routes, gateway._bucket(key, deployment.pk)).model_version_id == (
            version.pk
        ):
            return key
    raise AssertionError(f"no routing key lands on {version}")


@dataclass
class Caller:
    """Sends predictions through the API and keeps every status code it saw."""

    client: object
    deployment: Deployment
    statuses: list

    def predict(self, inputs: list[dict], *, routing_key: str | None = None):
        extra = {"HTTP_X_ROUTING_KEY": routing_key} if routing_key else {}
        response = self.client.post(
            url(self.deployment), {"inputs": inputs}, format="json", **extra
        )
        self.statuses.append(response.status_code)
        return response

    def answered(self, inputs: list[dict], **kwargs):
        """The response once one is a 200 (only 503s with Retry-After may come before)."""
        response = self.predict(inputs, **kwargs)
        if response.status_code == 503:
            assert response.headers.get("Retry-After"), response.content
            return None
        assert response.status_code == 200, response.content
        return response


def promoted_after_feeding(canary: Retrain, caller: Caller, inputs: list[dict]) -> bool:
    """One look at a canary: while it bakes, send it (two at a time, from `inputs`) what it
    still lacks of MIN_SAMPLES requests to be judged on; True once it is promoted. Poll it with
    a wait."""
    canary.refresh_from_db()
    if canary.state == Retrain.State.CANARY:
        sent = PredictionLog.objects.filter(
            model_version=canary.challenger, created_at__gte=canary.step_started_at
        ).count()
        if sent < MIN_SAMPLES:
            caller.predict(inputs[sent : sent + 2])
    return canary.state == Retrain.State.PROMOTED


def listening_pid(address: str, under: int) -> int:
    """The pid, among `under`'s descendants, that listens on `address`'s port."""
    port = int(address.rsplit(":", 1)[1])
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                inodes.add(f"socket:[{fields[9]}]")
    for pid in descendants(under):
        fds = Path(f"/proc/{pid}/fd")
        try:
            if any(os.readlink(fd) in inodes for fd in fds.iterdir()):
                return pid
        except (FileNotFoundError, PermissionError):
            continue
    raise AssertionError(f"nothing under {under} listens on {address}")
