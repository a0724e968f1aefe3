"""Deployments and their routes through the API, attacked the way a tenant would probe them."""

import logging
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from serving import tasks
from serving.models import Deployment, LoopEvent, PredictionLog, Replica, Retrain, Route
from serving.services import deployment_delete, deployments_purge, routes_set
from tenants.actors import Actor
from tenants.errors import DomainError
from tenants.models import AuditEvent
from tests.factories import JobFactory, ModelVersionFactory


@pytest.fixture
def dev(org, member_factory, key_client_for):
    return key_client_for(member_factory(org, "developer"), org)


def _routes_url(deployment):
    return f"/api/v1/orgs/{deployment.organization.slug}/deployments/{deployment.name}/routes/"


def _put(client, deployment, routes):
    return client.put(_routes_url(deployment), {"routes": routes}, format="json")


def _snapshot(deployment):
    return sorted(
        Route.objects.filter(deployment=deployment).values_list(
            "model_version_id", "weight", "mode"
        )
    )


def test_create_with_routes_then_read_it_back(org, dev):
    version = ModelVersionFactory(organization=org, recipe_name="tabular-classifier")
    response = dev.post(
        f"/api/v1/orgs/{org.slug}/deployments/",
        {
            "name": "churn",
            "recipe": "tabular-classifier",
            "max_replicas": 3,
            "routes": [{"model_version": version.pk, "weight": 100}],
        },
        format="json",
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["routes"] == [
        {
            "model_version": version.pk,
            "model": version.registered_model.name,
            "version": version.number,
            "weight": 100,
            "mode": "live",
            "stage": "stable",
        }
    ]
    assert body["max_replicas"] == 3 and body["resource_class"] == "cpu"
    assert AuditEvent.objects.filter(organization=org, action="deployment.create").exists()
    assert LoopEvent.objects.get(organization=org).kind == LoopEvent.Kind.DEPLOYED


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "a", "recipe": "no-such-recipe"}, "recipe"),
        (
            {"name": "a", "recipe": "tabular-classifier", "resource_class": "h9000"},
            "resource_class",
        ),
        (
            {"name": "a", "recipe": "tabular-classifier", "min_replicas": 3, "max_replicas": 2},
            "min_replicas",
        ),
        ({"name": "a", "recipe": "tabular-classifier", "max_replicas": 10_000}, "max_replicas"),
        ({"name": "a", "recipe": "tabular-classifier", "log_sample_rate": 1.5}, "log_sample_rate"),
        ({"name": "../etc", "recipe": "tabular-classifier"}, "name"),
    ],
)
def test_bad_deployments_are_400_naming_the_field(org, dev, body, field):
    response = dev.post(f"/api/v1/orgs/{org.slug}/deployments/", body, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()["fields"]
    assert not Deployment.objects.filter(organization=org).exists()


def test_a_taken_name_is_409(org, dev, make_deployment):
    make_deployment(org, name="churn")
    response = dev.post(
        f"/api/v1/orgs/{org.slug}/deployments/",
        {"name": "churn", "recipe": "tabular-classifier"},
        format="json",
    )
    assert response.status_code == 409


def _mine(org, recipe="tabular-classifier"):
    return ModelVersionFactory(organization=org, recipe_name=recipe)


ATTACKS = {
    "another tenant's version": lambda org, other: [
        {"model_version": _mine(other).pk, "weight": 100}
    ],
    "a version that does not exist": lambda org, other: [
        {"model_version": 987_654_321, "weight": 100}
    ],
    "a weight of 101": lambda org, other: [{"model_version": _mine(org).pk, "weight": 101}],
    "a negative weight": lambda org, other: [{"model_version": _mine(org).pk, "weight": -1}],
    "a fractional weight": lambda org, other: [{"model_version": _mine(org).pk, "weight": 99.5}],
    "live weights over 100": lambda org, other: [
        {"model_version": _mine(org).pk, "weight": 70},
        {"model_version": _mine(org).pk, "weight": 40},
    ],
    "live weights under 100": lambda org, other: [
        {"model_version": _mine(org).pk, "weight": 50},
        {"model_version": _mine(org).pk, "weight": 40},
    ],
    "only shadow routes": lambda org, other: [
        {"model_version": _mine(org).pk, "weight": 100, "mode": "shadow"}
    ],
    "a shadow weight of 200": lambda org, other: [
        {"model_version": _mine(org).pk, "weight": 100},
        {"model_version": _mine(org).pk, "weight": 200, "mode": "shadow"},
    ],
    "the same version twice": lambda org, other: (
        lambda v: [
            {"model_version": v.pk, "weight": 50},
            {"model_version": v.pk, "weight": 50},
        ]
    )(_mine(org)),
    "the same version live and shadow": lambda org, other: (
        lambda v: [
            {"model_version": v.pk, "weight": 100},
            {"model_version": v.pk, "weight": 10, "mode": "shadow"},
        ]
    )(_mine(org)),
    "another recipe's version": lambda org, other: [
        {"model_version": _mine(org, "text-classifier").pk, "weight": 100}
    ],
    "no routes": lambda org, other: [],
    "an unknown mode": lambda org, other: [
        {"model_version": _mine(org).pk, "weight": 100, "mode": "primary"}
    ],
    "a version id as a string path": lambda org, other: [
        {"model_version": "1 OR 1=1", "weight": 100}
    ],
    "eleven routes": lambda org, other: [
        {
            "model_version": _mine(org).pk,
            "weight": 10 if i < 10 else 0,
            "mode": "live" if i < 10 else "shadow",
        }
        for i in range(11)
    ],
}


@pytest.mark.parametrize("attack", ATTACKS)
def test_routes_set_refuses_the_attack_and_changes_nothing(
    org, other_org, dev, make_deployment, attack
):
    deployment, _versions = make_deployment(org)
    before = _snapshot(deployment)
    events = LoopEvent.objects.count()
    response = _put(dev, deployment, ATTACKS[attack](org, other_org))
    assert response.status_code == 400, response.content
    assert response.json()["code"] == "invalid"
    assert "routes" in response.json()["fields"]
    assert _snapshot(deployment) == before
    assert LoopEvent.objects.count() == events


def test_another_tenants_version_reads_exactly_like_a_missing_one(
    org, other_org, dev, make_deployment
):
    deployment, _ = make_deployment(org)
    theirs = _mine(other_org)
    missing = theirs.pk + 1000
    a = _put(dev, deployment, [{"model_version": theirs.pk, "weight": 100}]).json()
    b = _put(dev, deployment, [{"model_version": missing, "weight": 100}]).json()
    assert a["detail"].replace(str(theirs.pk), "N") == b["detail"].replace(str(missing), "N")


def test_routes_set_splits_traffic_drains_old_replicas_and_records_it(org, dev, make_deployment):
    deployment, (old,) = make_deployment(org)
    replica = Replica.objects.create(
        organization=org,
        deployment=deployment,
        model_version=old,
        job=JobFactory(organization=org),
        state=Replica.State.READY,
    )
    new, shadow = _mine(org), _mine(org)
    response = _put(
        dev,
        deployment,
        [
            {"model_version": new.pk, "weight": 90},
            {"model_version": shadow.pk, "weight": 30, "mode": "shadow"},
            {"model_version": _mine(org).pk, "weight": 10, "stage": "canary"},
        ],
    )
    assert response.status_code == 200, response.content
    assert sum(r["weight"] for r in response.json() if r["mode"] == "live") == 100
    replica.refresh_from_db()
    assert replica.state == Replica.State.DRAINING and replica.drain_started_at is None
    event = LoopEvent.objects.filter(kind=LoopEvent.Kind.DEPLOYED).first()
    assert event.data["previous"][0]["model_version"] == old.pk
    assert event.data["replicas_draining"] == 1
    assert AuditEvent.objects.filter(action="deployment.routes_set").count() == 2


def test_a_viewer_reads_but_cannot_route(org, member_factory, key_client_for, make_deployment):
    deployment, _ = make_deployment(org)
    viewer = key_client_for(member_factory(org, "viewer"), org)
    assert viewer.get(f"/api/v1/orgs/{org.slug}/deployments/churn/").status_code == 200
    assert (
        _put(viewer, deployment, [{"model_version": _mine(org).pk, "weight": 100}]).status_code
        == 403
    )


def test_update_checks_min_against_the_stored_max(org, dev, make_deployment):
    make_deployment(org, max_replicas=2)
    url = f"/api/v1/orgs/{org.slug}/deployments/churn/"
    response = dev.patch(url, {"min_replicas": 3}, format="json")
    assert response.status_code == 400 and "min_replicas" in response.json()["fields"]
    response = dev.patch(url, {"min_replicas": 1, "max_replicas": 4}, format="json")
    assert response.status_code == 200
    assert (response.json()["min_replicas"], response.json()["max_replicas"]) == (1, 4)


def test_delete_stops_the_replicas_jobs(org, dev, make_deployment, monkeypatch):
    """replica_job_stop is another helper's, unfinished on this branch: replaced here by one
    that records the call."""
    from jobs.services import replicas as replica_jobs

    stopped = []
    monkeypatch.setattr(
        replica_jobs, "replica_job_stop", lambda *, job, actor, reason: stopped.append(job.pk)
    )
    deployment, (v,) = make_deployment(org)
    job = JobFactory(organization=org)
    Replica.objects.create(organization=org, deployment=deployment, model_version=v, job=job)
    assert dev.delete(f"/api/v1/orgs/{org.slug}/deployments/churn/").status_code == 204
    assert stopped == [job.pk]
    assert not Replica.objects.exists()
    assert AuditEvent.objects.filter(action="deployment.delete").exists()


@pytest.mark.parametrize(
    "routes",
    [
        "another tenant's version object",
        [{"model_version": True, "weight": 100}],
        [{"weight": 100}],
        [{"model_version": None, "weight": 100}],
        "a bool weight",
        "a string weight",
    ],
)
def test_routes_set_called_directly_refuses_what_the_api_would(
    org, other_org, make_deployment, routes
):
    """The loop's rollout calls routes_set with objects, not JSON: the same checks hold."""
    deployment, _ = make_deployment(org)
    before = _snapshot(deployment)
    mine = _mine(org)
    routes = (
        {
            "another tenant's version object": [{"model_version": _mine(other_org), "weight": 100}],
            "a bool weight": [{"model_version": mine, "weight": True}],
            "a string weight": [{"model_version": mine, "weight": "100"}],
        }.get(routes, routes)
        if isinstance(routes, str)
        else routes
    )
    with pytest.raises(DomainError):
        routes_set(deployment=deployment, routes=routes, actor=Actor())
    assert _snapshot(deployment) == before


def test_the_loops_rollout_names_its_own_timeline_step(org, make_deployment):
    """routes_set as the canary and rollback call it: their kind, message and data."""
    deployment, (stable,) = make_deployment(org)
    challenger = _mine(org)
    routes_set(
        deployment=deployment,
        routes=[
            {"model_version": stable, "weight": 90},
            {"model_version": challenger, "weight": 10, "stage": "canary"},
        ],
        actor=Actor(),
        event_kind=LoopEvent.Kind.CANARY_STARTED,
        message="canary at 10%",
        event_data={"gate": 7},
    )
    event = LoopEvent.objects.filter(deployment=deployment).first()
    assert (event.kind, event.message, event.data["gate"]) == ("canary_started", "canary at 10%", 7)
    assert Route.objects.get(deployment=deployment, model_version=challenger).stage == "canary"


def test_predict_without_a_live_route_is_409(org, dev, make_deployment):
    deployment, _ = make_deployment(org)
    Route.objects.filter(deployment=deployment).delete()
    response = dev.post(
        f"/api/v1/orgs/{org.slug}/deployments/churn/predict/", {"inputs": [{}]}, format="json"
    )
    assert response.status_code == 409
    assert response.json()["code"] == "deployment_not_routed"


def _log(deployment, version, rows: int) -> None:
    PredictionLog.objects.bulk_create(
        (
            PredictionLog(
                organization=deployment.organization,
                deployment=deployment,
                model_version=version,
                inputs={"x": i},
                output={"label": "a"},
                latency_ms=5.0,
            )
            for i in range(rows)
        ),
        batch_size=1000,
    )


def _log_deletes(queries) -> list[str]:
    return [q["sql"] for q in queries if q["sql"].startswith('DELETE FROM "serving_predictionlog"')]


def test_a_deleted_deployment_is_gone_at_once_its_name_free_and_its_log_purged_in_batches(
    org, dev, make_deployment, settings, client, member_factory
):
    settings.SERVING_RETENTION_BATCH = 500
    deployment, (version,) = make_deployment(org)
    kept, (kept_version,) = make_deployment(org, name="kept")
    _log(deployment, version, 3000)
    _log(kept, kept_version, 10)
    retrain = Retrain.objects.create(
        organization=org, deployment=deployment, job=JobFactory(organization=org), champion=version
    )
    base = f"/api/v1/orgs/{org.slug}/deployments/"

    with CaptureQueriesContext(connection) as queries:
        assert dev.delete(base + "churn/").status_code == 204
    # Answered without a single delete of the log: it is purged after, off the request.
    assert _log_deletes(queries) == []
    assert PredictionLog.objects.filter(deployment_id=deployment.pk).count() == 3000
    assert AuditEvent.objects.filter(action="deployment.delete", organization=org).exists()

    # Gone for every reader of the API and the pages.
    prediction_id = str(PredictionLog.objects.filter(deployment_id=deployment.pk)[0].prediction_id)
    calls = [
        ("get", "churn/", None),
        ("get", "churn/timeline/", None),
        ("get", "churn/retrains/", None),
        ("get", "churn/stats/", None),
        ("post", "churn/predict/", {"inputs": [{"x": 1}]}),
        ("post", "churn/feedback/", {"items": [{"prediction_id": prediction_id, "label": "a"}]}),
        ("put", "churn/routes/", {"routes": [{"model_version": version.pk, "weight": 100}]}),
        ("patch", "churn/", {"min_replicas": 0}),
        ("delete", "churn/", None),
    ]
    for method, path, body in calls:
        response = getattr(dev, method)(base + path, body, format="json")
        assert response.status_code == 404, (method, path, response.content)
    assert [row["name"] for row in dev.get(base).json()["results"]] == ["kept"]
    assert dev.get(f"/api/v1/orgs/{org.slug}/retrains/{retrain.pk}/").status_code == 404
    client.force_login(member_factory(org, "developer"))
    assert client.get(reverse("serving:deployment", args=[org.slug, "churn"])).status_code == 404
    names = client.get(reverse("serving:deployments", args=[org.slug])).content.decode()
    assert "kept" in names and "/deployments/churn/" not in names

    # Its name is free at once, and the new deployment does not inherit the old one's retrains.
    created = dev.post(
        base,
        {
            "name": "churn",
            "recipe": "tabular-classifier",
            "routes": [{"model_version": version.pk, "weight": 100}],
        },
        format="json",
    )
    assert created.status_code == 201, created.content
    old_retrain = reverse("serving:retrain", args=[org.slug, "churn", retrain.pk])
    assert client.get(old_retrain).status_code == 404

    # The purge: the log a batch at a time, then the deployment's row.
    with CaptureQueriesContext(connection) as queries:
        assert deployments_purge(now=timezone.now() + timedelta(hours=1)) == 3000
    assert len(_log_deletes(queries)) >= 3000 // 500
    assert not PredictionLog.objects.filter(deployment_id=deployment.pk).exists()
    assert not Deployment.all_objects.filter(pk=deployment.pk).exists()
    assert not Retrain.objects.filter(pk=retrain.pk).exists()
    assert PredictionLog.objects.filter(deployment=kept).count() == 10
    assert Deployment.objects.get(organization=org, name="churn").pk != deployment.pk


def test_a_purge_out_of_time_stops_between_batches_and_the_next_run_goes_on(
    org, make_deployment, settings
):
    settings.SERVING_RETENTION_BATCH = 500
    deployment, (version,) = make_deployment(org)
    _log(deployment, version, 1200)
    deployment_delete(deployment=deployment, actor=Actor())

    assert deployments_purge(budget_s=0) == 500
    assert PredictionLog.objects.filter(deployment_id=deployment.pk).count() == 700
    assert Deployment.all_objects.get(pk=deployment.pk).deleted_at is not None
    assert deployments_purge(now=timezone.now() + timedelta(hours=1)) == 700
    assert not Deployment.all_objects.filter(pk=deployment.pk).exists()


def test_a_deletion_during_a_broker_outage_is_answered_and_purged_by_the_beats_run(
    org,
    dev,
    make_deployment,
    broker_down,
    django_capture_on_commit_callbacks,
    caplog,
):
    """The deletion's mark is what owes the purge: the task sent after the commit only hurries
    it, and with the broker down the periodic run (the same task, from beat) finds the mark."""
    deployment, (version,) = make_deployment(org)
    _log(deployment, version, 50)
    with (
        caplog.at_level(logging.WARNING, logger="serving.services"),
        django_capture_on_commit_callbacks(execute=True),
    ):
        response = dev.delete(f"/api/v1/orgs/{org.slug}/deployments/churn/")
    assert response.status_code == 204
    assert "waits for the periodic purge" in caplog.text
    assert PredictionLog.objects.filter(deployment_id=deployment.pk).count() == 50

    assert tasks.deployments_purge() == 50
    assert not PredictionLog.objects.filter(deployment_id=deployment.pk).exists()
    # Requests that found it before the deletion may still log a row: the row they point to
    # stays for a grace period, and the run after it goes.
    assert Deployment.all_objects.filter(pk=deployment.pk).exists()
    deployments_purge(now=timezone.now() + timedelta(hours=1))
    assert not Deployment.all_objects.filter(pk=deployment.pk).exists()


def test_the_purge_is_a_registered_task_on_the_beat(settings):
    from factory_saas.celery import app

    app.loader.import_default_modules()
    assert "serving.deployments_purge" in app.tasks
    entry = settings.CELERY_BEAT_SCHEDULE["serving-deployments-purge"]
    assert entry == {
        "task": "serving.deployments_purge",
        "schedule": settings.SERVING_PURGE_EVERY_S,
    }
