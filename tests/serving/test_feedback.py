"""Feedback labels for logged predictions, attacked as a tenant would, and labelled windows
saved as dataset versions through the registry."""

import csv
import io
import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from registry.models import DatasetVersion
from registry.storage import get_storage
from serving.models import PredictionLog
from tenants.models import AuditEvent


@pytest.fixture
def dev(org, member_factory, key_client_for):
    return key_client_for(member_factory(org, "developer"), org)


def _log(deployment, version, inputs=None, **fields):
    return PredictionLog.objects.create(
        organization=deployment.organization,
        deployment=deployment,
        model_version=version,
        inputs=inputs if inputs is not None else {"x": 1},
        latency_ms=3.0,
        **({"output": {"label": "yes"}} | fields),
    )


def _url(deployment, action="feedback"):
    return f"/api/v1/orgs/{deployment.organization.slug}/deployments/{deployment.name}/{action}/"


def test_labels_attach_to_this_deployments_predictions_and_repeat_harmlessly(
    org, dev, make_deployment
):
    deployment, (v,) = make_deployment(org)
    rows = [_log(deployment, v) for _ in range(3)]
    items = [{"prediction_id": str(r.prediction_id), "label": "yes"} for r in rows]
    first = dev.post(_url(deployment), {"items": items}, format="json")
    assert first.json() == {"labelled": 3, "unchanged": 0, "unknown": 0}
    again = dev.post(_url(deployment), {"items": items}, format="json")
    assert again.json() == {"labelled": 0, "unchanged": 3, "unknown": 0}
    assert set(PredictionLog.objects.values_list("label", flat=True)) == {"yes"}
    corrected = dev.post(_url(deployment), {"items": [items[0] | {"label": "no"}]}, format="json")
    assert corrected.json()["labelled"] == 1
    rows[0].refresh_from_db()
    assert rows[0].label == "no"


def test_another_tenants_or_deployments_prediction_is_unknown_and_never_written(
    org, other_org, dev, make_deployment
):
    deployment, (v,) = make_deployment(org)
    sibling, (sv,) = make_deployment(org, name="sibling")
    theirs, (tv,) = make_deployment(other_org)
    foreign = [_log(theirs, tv), _log(sibling, sv)]
    mine = _log(deployment, v)
    items = [{"prediction_id": str(r.prediction_id), "label": "pwned"} for r in foreign]
    items += [
        {"prediction_id": str(uuid.uuid4()), "label": "x"},
        {"prediction_id": "not-a-uuid", "label": "x"},
        {"prediction_id": str(mine.prediction_id), "label": "yes"},
    ]
    response = dev.post(_url(deployment), {"items": items}, format="json")
    assert response.status_code == 200
    assert response.json() == {"labelled": 1, "unchanged": 0, "unknown": 4}
    for row in foreign:
        row.refresh_from_db()
        assert row.label is None and row.labelled_at is None


@pytest.mark.parametrize(
    "body",
    [
        {"items": []},
        {"items": "x"},
        {"items": [{"prediction_id": str(uuid.uuid4())}]},
        {"items": [{"prediction_id": str(uuid.uuid4()), "label": None}]},
        {"items": [{"prediction_id": str(uuid.uuid4()), "label": "y" * 20_000}]},
        {"items": [{"prediction_id": str(uuid.uuid4()), "label": 1}] * 1001},
        {"items": [{"prediction_id": "x" * 1000, "label": 1}]},
    ],
    ids=["empty", "not a list", "no label", "null label", "huge label", "too many", "long id"],
)
def test_bad_feedback_is_400_and_writes_nothing(org, dev, make_deployment, body):
    deployment, (v,) = make_deployment(org)
    row = _log(deployment, v)
    response = dev.post(_url(deployment), body, format="json")
    assert response.status_code == 400, response.content
    assert response.json()["code"] == "invalid"
    row.refresh_from_db()
    assert row.label is None


def test_a_viewer_cannot_label(org, member_factory, key_client_for, make_deployment):
    deployment, (v,) = make_deployment(org)
    row = _log(deployment, v)
    viewer = key_client_for(member_factory(org, "viewer"), org)
    body = {"items": [{"prediction_id": str(row.prediction_id), "label": "x"}]}
    assert viewer.post(_url(deployment), body, format="json").status_code == 403


def test_stats_show_the_live_metric_over_labelled_predictions(org, dev, make_deployment):
    deployment, (v,) = make_deployment(org)
    right, wrong = _log(deployment, v), _log(deployment, v)
    _log(deployment, v, error="replica_error", output=None)
    items = [
        {"prediction_id": str(right.prediction_id), "label": "yes"},
        {"prediction_id": str(wrong.prediction_id), "label": "no"},
    ]
    dev.post(_url(deployment), {"items": items}, format="json")
    stats = dev.get(_url(deployment, "stats")).json()
    (row,) = stats["versions"]
    assert row["model_version"] == v.pk and row["mode"] == "live"
    assert (row["requests"], row["errors"], row["labelled"]) == (3, 1, 2)
    assert row["metric"] == "accuracy" and row["metric_value"] == 0.5


@pytest.fixture
def local_storage(settings, tmp_path):
    settings.STORAGE_BACKEND = "local"
    settings.STORAGE_LOCAL_ROOT = str(tmp_path / "store")


def test_a_labelled_window_becomes_a_dataset_version(org, dev, make_deployment, local_storage):
    deployment, (v,) = make_deployment(org)
    old = _log(deployment, v, inputs={"x": 0, "y": "old"}, label="no")
    PredictionLog.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=3))
    for i in range(4):
        _log(deployment, v, inputs={"x": i, "y": "a"}, label="yes" if i % 2 else "no")
    _log(deployment, v, inputs={"x": 9, "y": "b"})  # never labelled
    _log(deployment, v, inputs={"x": 8, "y": "c"}, label="no", mode="shadow")
    now = timezone.now()
    response = dev.post(
        _url(deployment, "datasets"),
        {
            "dataset": "churn-feedback",
            "since": (now - timedelta(days=1)).isoformat(),
            "until": (now + timedelta(minutes=1)).isoformat(),
            "target": "churned",
        },
        format="json",
    )
    assert response.status_code == 201, response.content
    assert response.json() == {"dataset": "churn-feedback", "number": 1, "row_count": 4}
    version = DatasetVersion.objects.get(organization=org, dataset__name="churn-feedback")
    assert version.derived_from_model_version == v
    with get_storage().open(version.storage_key) as stream:
        rows = list(csv.DictReader(io.TextIOWrapper(stream, encoding="utf-8")))
    assert [r["churned"] for r in rows] == ["no", "yes", "no", "yes"]
    assert {r["y"] for r in rows} == {"a"}
    event = AuditEvent.objects.get(action="deployment.feedback_saved")
    assert event.data["rows"] == 4 and event.target_id == str(deployment.pk)


def test_an_empty_window_is_400_and_makes_no_dataset(org, dev, make_deployment, local_storage):
    deployment, _ = make_deployment(org)
    now = timezone.now()
    response = dev.post(
        _url(deployment, "datasets"),
        {
            "dataset": "empty",
            "since": (now - timedelta(days=1)).isoformat(),
            "until": now.isoformat(),
        },
        format="json",
    )
    assert response.status_code == 400
    assert not DatasetVersion.objects.filter(organization=org).exists()
