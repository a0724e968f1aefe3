"""A policy that appends feedback retrains on the newest data plus the deployment's labelled
predictions, saved as a new version of the policy's dataset through the registry."""

from datetime import timedelta

import pytest
from django.utils import timezone

from jobs.models import ResourceClass
from registry.models import DatasetVersion
from registry.services import dataset_create, dataset_version_create
from registry.storage import get_storage
from serving.loop import loop_advance
from serving.models import (
    Deployment,
    DriftReport,
    LoopEvent,
    PredictionLog,
    Retrain,
    RetrainPolicy,
    Route,
)
from tenants.actors import Actor
from tests.factories import ModelVersionFactory

pytestmark = pytest.mark.usefixtures("local_storage")


@pytest.fixture
def setup(org, member_factory, tmp_path):
    creator = member_factory(org, "developer")
    dataset = dataset_create(organization=org, name="churn", actor=Actor(user=creator))
    path = tmp_path / "churn.csv"
    path.write_text("age,plan,label\n31,basic,no\n45,pro,yes\n52,pro,yes\n23,basic,no")
    base = dataset_version_create(
        dataset=dataset, path=path, filename="churn.csv", actor=Actor(user=creator)
    )
    champion = ModelVersionFactory(
        organization=org, recipe_name="tabular-classifier", parameters={"target": "label"}
    )
    champion.trained_on.add(base)
    deployment = Deployment.objects.create(
        organization=org,
        name="churn",
        recipe="tabular-classifier",
        resource_class=ResourceClass.objects.get(name="cpu"),
        created_by=creator,
    )
    Route.objects.create(
        organization=org, deployment=deployment, model_version=champion, weight=100
    )
    RetrainPolicy.objects.create(
        organization=org, deployment=deployment, dataset=dataset, append_feedback=True
    )
    now = timezone.now()
    DriftReport.objects.create(
        organization=org,
        deployment=deployment,
        model_version=champion,
        window_start=now,
        window_end=now,
        rows=100,
        drifted=True,
        drifted_share=1.0,
    )
    return deployment, champion, base


def _logged(deployment, version, inputs, label, *, labelled_at=None):
    return PredictionLog.objects.create(
        organization=deployment.organization,
        deployment=deployment,
        model_version=version,
        inputs=inputs,
        output={"label": "no"},
        latency_ms=3,
        label=label,
        labelled_at=labelled_at or timezone.now(),
    )


def test_labelled_feedback_is_appended_as_a_new_version_and_trained_on(setup):
    deployment, champion, base = setup
    _logged(deployment, champion, {"age": 60, "plan": "pro"}, "yes")
    _logged(deployment, champion, {"age": 19, "plan": "basic, annual"}, "no")
    # Hostile or useless rows are left out: a nested value, no label, labelled before the base.
    _logged(deployment, champion, {"age": {"$gt": 1}, "plan": "pro"}, "yes")
    _logged(deployment, champion, {"age": 40, "plan": "pro"}, None)
    _logged(
        deployment,
        champion,
        {"age": 41, "plan": "pro"},
        "yes",
        labelled_at=base.created_at - timedelta(seconds=1),
    )

    retrain = loop_advance(deployment_id=deployment.pk)

    assert retrain.state == Retrain.State.TRAINING
    data = retrain.job.input_dataset_version
    assert data.dataset == base.dataset and data.number == base.number + 1
    assert data.derived_from_dataset_version == base and data.row_count == 6
    with get_storage().open(data.storage_key) as stored:
        text = stored.read().decode()
    assert text.splitlines()[-2:] == ["60,pro,yes", '19,"basic, annual",no']
    submitted = LoopEvent.objects.get(kind=LoopEvent.Kind.RETRAIN_SUBMITTED)
    assert submitted.data["feedback_rows"] == 2 and "2 labelled predictions" in submitted.message


def test_without_new_feedback_the_newest_version_is_used_as_is(setup):
    deployment, _champion, base = setup
    retrain = loop_advance(deployment_id=deployment.pk)
    assert retrain.job.input_dataset_version == base
    assert DatasetVersion.objects.filter(dataset=base.dataset).count() == 1


def test_a_creator_without_datasets_write_trains_on_the_newest_data_saying_why(setup):
    deployment, champion, base = setup
    deployment.created_by.memberships.update(role="viewer")
    _logged(deployment, champion, {"age": 60, "plan": "pro"}, "yes")
    retrain = loop_advance(deployment_id=deployment.pk)
    # A viewer may not submit jobs either: the retrain is skipped, with both reasons.
    skipped = LoopEvent.objects.get(deployment=deployment)
    assert retrain.state == Retrain.State.FAILED
    assert skipped.kind == LoopEvent.Kind.RETRAIN_SKIPPED
    assert "datasets:write" in skipped.data["feedback_error"]
    assert DatasetVersion.objects.filter(dataset=base.dataset).count() == 1
