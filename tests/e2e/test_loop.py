"""A tenant watches the loop in a real browser: creates a deployment on its page, sends traffic
through the API with a key, sees drift after shifted inputs, sets the retrain policy and finds the
loop's retrain on the deployment's timeline.

Headless Chromium against a live server on the test database. The replica is a fake one (the
HTTP server of tests/serving keeping the replica contract), not a pool worker's child: a real
replica adds a torch process and its start to a test about pages; tests/factory_saas
(test_embedded) and tests/serving cover real replicas. Drift and the loop run their real code
(drift_check, loop_tick_all); screenshots land in test-artifacts/e2e/ and docs/img/loop/.
"""

from __future__ import annotations

import csv
import random
import re
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect

from jobs.models import Job
from jobs.samples.tabular import write_tabular_sample
from registry.services import dataset_create, dataset_version_create
from serving.loop import loop_tick_all
from serving.models import Deployment, DriftReport, LoopEvent, PredictionLog, Retrain
from serving.monitoring import drift_check
from serving.services import deployment_update
from tenants.actors import Actor
from tenants.services import api_key_create
from tests.factories import TEST_PASSWORD, ModelVersionFactory
from tests.serving.replicas import FakeReplica, ready_replica

browser_test = pytest.mark.django_db(transaction=True)

WINDOW = 300  # rows per drift window: three requests of 100


def _customers(path: Path, *, seed: int) -> list[dict]:
    """Rows like the training data (the sample drawn again with another seed), as inputs."""
    write_tabular_sample(path, rows=2 * WINDOW, seed=seed)
    with path.open(newline="") as handle:
        return [
            {
                "age": int(row["age"]),
                "monthly_spend": float(row["monthly_spend"]) if row["monthly_spend"] else None,
                "tenure_months": int(row["tenure_months"]),
                "support_calls": int(row["support_calls"]),
                "plan": row["plan"],
                "region": row["region"],
            }
            for row in csv.DictReader(handle)
        ]


def _shifted(rng: random.Random) -> dict:
    """A customer from a market the model never saw: older, spending far more, all premium."""
    return {
        "age": rng.randint(70, 95),
        "monthly_spend": round(rng.uniform(300, 900), 2),
        "tenure_months": rng.randint(0, 3),
        "support_calls": rng.randint(8, 15),
        "plan": "premium",
        "region": "west",
    }


def _send(api: httpx.Client, url: str, rows: list[dict]) -> list[str]:
    ids = []
    for start in range(0, len(rows), 100):  # the most inputs one request carries
        response = api.post(url, json={"inputs": rows[start : start + 100]})
        assert response.status_code == 200, response.text
        ids += [p["prediction_id"] for p in response.json()["predictions"]]
    return ids


def _shot(page, name: str, heading: str) -> None:
    """One numbered screenshot, among the page's, of the section under `heading`'s id."""
    page.screens.count += 1
    path = page.screens.folder / f"{page.screens.count:02d}-{name}.png"
    page.locator(f"section[aria-labelledby={heading}]").screenshot(path=path)


@pytest.fixture
def replica():
    fake = FakeReplica("replica-1").start()
    yield fake
    fake.stop()


@browser_test
def test_a_tenant_deploys_sends_traffic_sees_drift_and_the_loop_retrains(
    live_server, page, org, member_factory, tmp_path, replica, settings
):
    settings.DRIFT_SETTLE_S = 0  # the windows are read as soon as they are full
    owner = member_factory(org, "owner")
    actor = Actor(user=owner)
    dataset = dataset_create(organization=org, name="customers", actor=actor)
    path = tmp_path / "customers.csv"
    write_tabular_sample(path, rows=2000)
    data = dataset_version_create(dataset=dataset, path=path, filename="customers.csv", actor=actor)
    version = ModelVersionFactory(
        organization=org,
        registered_model__name="customers-churn",
        recipe_name="tabular-classifier",
        parameters={"target": "label", "epochs": 5},
        metrics={"val_accuracy": 0.84},
    )
    version.trained_on.add(data)
    _, token = api_key_create(
        organization=org, name="traffic", scopes=["predict", "deployments:write"], actor=actor
    )
    base, org_url = live_server.url, f"{live_server.url}/o/{org.slug}"

    page.goto(f"{base}/accounts/login/")
    page.fill("input[name=login]", owner.email)
    page.fill("input[name=password]", TEST_PASSWORD)
    page.locator("main form button[type=submit]").click()
    expect(page).not_to_have_url(re.compile(r"/accounts/login/"))

    # Create the deployment from the form on the deployments page.
    page.goto(f"{org_url}/deployments/")
    expect(page.locator("#deployments-empty")).to_be_visible()
    page.fill("input[name=name]", "churn")
    page.select_option("select[name=model_version]", str(version.pk))
    page.fill("input[name=min_replicas]", "1")
    page.screens("create-deployment")
    page.get_by_role("button", name="Create deployment").click()
    expect(page.locator("h1")).to_have_text("churn")
    deployment = Deployment.objects.get(organization=org, name="churn")
    assert [(r.model_version_id, r.weight) for r in deployment.routes.all()] == [(version.pk, 100)]
    deployment = deployment_update(deployment=deployment, actor=actor, drift_window_rows=WINDOW)
    ready_replica(deployment, version, replica)  # what the reconciler would start on the pool

    # Traffic through the API with the key: like the training data first, then shifted.
    rng = random.Random(5)  # noqa: S311  test data
    api = httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=30)
    url = f"{base}/api/v1/orgs/{org.slug}/deployments/churn/predict/"
    ids = _send(api, url, _customers(tmp_path / "live.csv", seed=11))
    feedback = api.post(
        url.replace("/predict/", "/feedback/"),
        json={"items": [{"prediction_id": i, "label": rng.choice(["0", "1"])} for i in ids[:50]]},
    )
    assert feedback.status_code == 200 and feedback.json()["labelled"] == 50, feedback.text
    assert len(replica.requests) == 2 * WINDOW // 100
    drift_check(deployment)
    reports = DriftReport.objects.filter(deployment=deployment).order_by("window_end")
    assert [r.drifted for r in reports] == [False] * 2
    _send(api, url, [_shifted(rng) for _ in range(2 * WINDOW)])
    assert PredictionLog.objects.filter(deployment=deployment).count() == 4 * WINDOW
    drift_check(deployment)
    reports = list(DriftReport.objects.filter(deployment=deployment).order_by("window_end"))
    assert [r.drifted for r in reports] == [False, False, True, True]

    page.reload()
    expect(page.locator("#replicas")).to_contain_text("Ready")
    expect(page.locator("#drift")).to_contain_text("yes")
    page.screens("deployment")
    _shot(page, "routes", "routes-h")
    _shot(page, "replicas", "replicas-h")
    _shot(page, "traffic", "traffic-h")
    _shot(page, "drift", "drift-h")

    # The retrain policy, set on the page: retrain on drift, from the customers dataset.
    policy = page.locator("#retrain-policy")
    policy.locator("input[name=enabled]").check()
    policy.locator("input[name=on_drift]").check()
    policy.locator("select[name=dataset]").select_option(label="customers")
    _shot(page, "retrain-policy", "policy-h")
    policy.locator("button[type=submit]").click()
    expect(page.get_by_text(re.compile("saved", re.I)).first).to_be_visible()
    assert deployment.retrain_policy.on_drift and deployment.retrain_policy.dataset == dataset

    # The loop's tick finds the drifted windows and submits the retrain as a training job.
    for _ in range(3):  # trigger, prepare the data, submit
        loop_tick_all()
    retrain = Retrain.objects.get(deployment=deployment)
    assert retrain.job is not None and retrain.job.kind == Job.Kind.TRAIN
    kinds = set(LoopEvent.objects.filter(deployment=deployment).values_list("kind", flat=True))
    assert {"deployed", "drift_detected", "retrain_submitted"} <= kinds, kinds
    page.reload()
    timeline = page.locator("#timeline")
    expect(timeline).to_contain_text("Retrain submitted")
    expect(timeline).to_contain_text("Drift detected")
    _shot(page, "timeline", "timeline-h")
    assert not [line for line in page.console if "error" in line.lower()], page.console
