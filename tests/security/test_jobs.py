"""A job must not carry scopes its submitter lacks.

A training job adds a version to its output model when it finishes, a prediction job adds one to
its output dataset, and a sweep moves its model's `best` alias. An API key that may only run jobs
(`jobs:write` and the reads) must not reach another team's model or dataset, or an alias, by
submitting one: each is refused at submit with a 403 naming the missing scope.
"""

import pytest

from jobs.models import Job, ResourceClass, Sweep
from jobs.services import JobOptions, training_job_submit
from tenants.actors import Actor
from tenants.errors import PermissionDeniedError
from tenants.services import api_key_create, api_key_revoke
from tests.factories import DatasetVersionFactory, ModelVersionFactory

pytestmark = pytest.mark.django_db

JOBS_ONLY = ["org:read", "jobs:read", "jobs:write", "datasets:read", "models:read"]


@pytest.fixture
def developer(org, member_factory):
    return member_factory(org, "developer")


@pytest.fixture
def their_model(org):
    """A model another team of the organization registered and serves."""
    return ModelVersionFactory(
        organization=org, registered_model__name="fraud-scorer", recipe_name="tabular-classifier"
    )


@pytest.fixture
def dataset(org):
    return DatasetVersionFactory(organization=org)


def _job(dataset, **extra):
    return {
        "recipe": "tabular-classifier",
        "parameters": {"target": "x"},
        "dataset": {"dataset": dataset.dataset.name, "number": dataset.number},
        **extra,
    }


def _sweep(dataset, name):
    return {
        "name": name,
        "recipe": "tabular-classifier",
        "parameters": {"target": "x"},
        "space": {"epochs": {"values": [1, 2]}},
        "strategy": "grid",
        "trial_count": 2,
        "metric": "val_accuracy",
        "dataset": {"dataset": dataset.dataset.name, "number": dataset.number},
    }


def _refused(response, scope):
    assert response.status_code == 403, response.content
    body = response.json()
    assert body["code"] == "permission_denied" and scope in body["detail"], body


def test_a_jobs_only_key_cannot_train_into_another_teams_model(
    org, developer, their_model, dataset, key_client_for
):
    client = key_client_for(developer, org, JOBS_ONLY)
    url = f"/api/v1/orgs/{org.slug}/jobs/"
    _refused(
        client.post(url, _job(dataset, output_model="fraud-scorer"), format="json"), "models:write"
    )
    # Continuing a version trains into its model unless told otherwise: the same write.
    continued = _job(dataset, model={"model": "fraud-scorer", "version": str(their_model.number)})
    _refused(client.post(url, continued, format="json"), "models:write")
    assert not Job.objects.exists()


def test_a_jobs_only_key_cannot_predict_into_another_teams_dataset(
    org, developer, their_model, dataset, key_client_for
):
    client = key_client_for(developer, org, JOBS_ONLY)
    body = {
        "kind": "infer",
        "dataset": {"dataset": dataset.dataset.name, "number": dataset.number},
        "model": {"model": "fraud-scorer", "version": str(their_model.number)},
        "output_dataset": dataset.dataset.name,
    }
    _refused(client.post(f"/api/v1/orgs/{org.slug}/jobs/", body, format="json"), "datasets:write")
    assert not Job.objects.exists()


def test_a_sweep_without_models_promote_cannot_move_best(
    org, developer, their_model, dataset, key_client_for
):
    url = f"/api/v1/orgs/{org.slug}/sweeps/"
    writer = key_client_for(developer, org, [*JOBS_ONLY, "models:write"])
    _refused(writer.post(url, _sweep(dataset, "fraud-scorer"), format="json"), "models:promote")
    # A new model gets its `best` alias moved by the sweep too, as each trial finishes later.
    _refused(writer.post(url, _sweep(dataset, "fresh-sweep"), format="json"), "models:promote")
    assert not Sweep.objects.exists() and not Job.objects.exists()


def test_the_same_submits_pass_with_the_scopes_they_need(
    org, developer, their_model, dataset, key_client_for
):
    jobs = f"/api/v1/orgs/{org.slug}/jobs/"
    only_jobs = key_client_for(developer, org, JOBS_ONLY)
    fresh = only_jobs.post(jobs, _job(dataset, output_model="brand-new"), format="json")
    assert fresh.status_code == 201, fresh.content  # a new model is the job's own to create

    models = key_client_for(developer, org, [*JOBS_ONLY, "models:write"])
    trained = models.post(jobs, _job(dataset, output_model="fraud-scorer"), format="json")
    assert trained.status_code == 201, trained.content

    datasets = key_client_for(developer, org, [*JOBS_ONLY, "datasets:write"])
    predict = {
        "kind": "infer",
        "dataset": {"dataset": dataset.dataset.name, "number": dataset.number},
        "model": {"model": "fraud-scorer", "version": str(their_model.number)},
        "output_dataset": dataset.dataset.name,
    }
    predicted = datasets.post(jobs, predict, format="json")
    assert predicted.status_code == 201, predicted.content

    promoter = key_client_for(developer, org, [*JOBS_ONLY, "models:write", "models:promote"])
    swept = promoter.post(
        f"/api/v1/orgs/{org.slug}/sweeps/", _sweep(dataset, "fraud-scorer"), format="json"
    )
    assert swept.status_code == 201, swept.content
    assert Job.objects.count() == 5


def test_a_revoked_key_adds_nothing_to_another_teams_model_whoever_calls_the_submit(
    org, developer, their_model, dataset
):
    """The submit asks what the key holds as every other service does (`actor_scopes`), not by a
    second computation of its own: a revoked key holds nothing, whether the call comes from the
    API, a page or later code acting for the key."""
    key, _token = api_key_create(
        organization=org,
        name="ci",
        scopes=[*JOBS_ONLY, "models:write"],
        actor=Actor(user=developer),
    )
    revoked = api_key_revoke(api_key=key, actor=Actor(user=developer))

    with pytest.raises(PermissionDeniedError, match="models:write"):
        training_job_submit(
            organization=org,
            actor=Actor(api_key=revoked),
            recipe="tabular-classifier",
            parameters={"target": "x"},
            dataset_version=dataset,
            options=JobOptions(resource_class=ResourceClass.objects.get(name="cpu")),
            output_model_name="fraud-scorer",
        )
    assert not Job.objects.exists()
