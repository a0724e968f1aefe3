"""Hyperparameter sweeps: fan-out, validation, the best trial marked, cancel as a whole."""

import pytest

from jobs.models import Job, JobState, Quota, Sweep
from jobs.services.submission import QuotaExceeded
from jobs.services.sweeps import sweep_cancel, sweep_create, sweep_points, sweeps_progress
from registry.models import ModelAlias
from tenants.actors import Actor
from tenants.errors import DomainError
from tests.factories import ModelVersionFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def make_sweep(org, owner, dataset_version, cpu):
    def make(**kwargs):
        fields = {
            "name": "churn",
            "recipe": "tabular-classifier",
            "base_parameters": {"target": "x"},
            "space": {
                "learning_rate": {"min": 1e-4, "max": 1e-2, "log": True},
                "epochs": {"values": [3, 5]},
            },
            "strategy": "random",
            "trial_count": 4,
            "metric": "val_accuracy",
            "mode": "max",
        }
        fields.update(kwargs)
        return sweep_create(
            organization=org,
            actor=Actor(user=owner),
            dataset_version=dataset_version,
            resource_class=cpu,
            **fields,
        )

    return make


def test_grid_points_are_the_cartesian_product_and_random_points_are_reproducible():
    grid = sweep_points(
        space={"a": {"values": [1, 2]}, "b": {"values": ["x", "y"]}},
        strategy="grid",
        count=10,
        seed=1,
    )
    assert grid == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
    space = {"lr": {"min": 1e-4, "max": 1e-1, "log": True}, "n": {"min": 1, "max": 9}}
    first = sweep_points(space=space, strategy="random", count=5, seed=3)
    assert first == sweep_points(space=space, strategy="random", count=5, seed=3)
    assert all(1e-4 <= p["lr"] <= 1e-1 and isinstance(p["n"], int) for p in first)


def test_a_sweep_submits_one_labelled_trial_per_point(make_sweep):
    sweep = make_sweep()
    trials = list(sweep.trials.order_by("pk"))
    assert len(trials) == 4 and all(t.state == JobState.QUEUED for t in trials)
    assert all(
        t.labels == {"sweep": str(sweep.pk)} and t.parameters["target"] == "x" for t in trials
    )
    assert all(t.output_model_name == "churn" for t in trials)


def test_a_parameter_the_recipe_lacks_is_refused(make_sweep):
    with pytest.raises(DomainError, match="no parameter"):
        make_sweep(space={"dropout_rate": {"values": [0.1]}})
    assert not Sweep.objects.exists() and not Job.objects.exists()


def test_a_grid_over_a_range_is_refused(make_sweep):
    with pytest.raises(DomainError, match="grid"):
        make_sweep(strategy="grid")


def test_a_refused_trial_leaves_no_sweep_and_no_trials(make_sweep, org, cpu):
    Quota.objects.create(organization=org, resource_class=cpu, limit_gpus=8, max_queued_jobs=2)
    with pytest.raises(QuotaExceeded):
        make_sweep()
    assert not Sweep.objects.exists() and not Job.objects.exists()


def test_when_all_trials_end_the_best_gets_the_best_alias(make_sweep, org):
    sweep = make_sweep(trial_count=3, space={"epochs": {"values": [1, 2, 3]}}, strategy="grid")
    trials = list(sweep.trials.order_by("pk"))
    for trial, accuracy in zip(trials[:2], (0.7, 0.9), strict=True):
        version = ModelVersionFactory(organization=org, metrics={"val_accuracy": accuracy})
        Job.objects.filter(pk=trial.pk).update(
            state=JobState.SUCCEEDED, output_model_version=version
        )
    assert sweeps_progress() == 0  # one trial still queued
    Job.objects.filter(pk=trials[2].pk).update(state=JobState.FAILED)
    assert sweeps_progress() == 1
    sweep.refresh_from_db()
    assert sweep.state == Sweep.State.SUCCEEDED and sweep.best_job == trials[1]
    alias = ModelAlias.objects.get(name="best")
    assert alias.version == Job.objects.get(pk=trials[1].pk).output_model_version


def test_cancelling_a_sweep_cancels_its_trials(make_sweep, owner):
    sweep = sweep_cancel(sweep=make_sweep(), actor=Actor(user=owner))
    assert sweep.state == Sweep.State.CANCELLED
    assert set(sweep.trials.values_list("state", flat=True)) == {JobState.CANCELLED}


def test_sweeps_through_the_api(org, member_factory, client_for, dataset_version):
    client = client_for(member_factory(org, "developer"))
    response = client.post(
        f"/api/v1/orgs/{org.slug}/sweeps/",
        {
            "name": "churn",
            "recipe": "tabular-classifier",
            "parameters": {"target": "x"},
            "space": {"epochs": {"values": [1, 2]}},
            "strategy": "grid",
            "trial_count": 2,
            "metric": "val_accuracy",
            "dataset": {"dataset": dataset_version.dataset.name, "number": dataset_version.number},
        },
        format="json",
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert [t["parameters"]["epochs"] for t in body["trials"]] == [1, 2]
    cancelled = client.post(f"/api/v1/orgs/{org.slug}/sweeps/{body['id']}/cancel/")
    assert cancelled.json()["state"] == "cancelled"


def test_sweep_page_shows_trials_side_by_side_and_cancels(make_sweep, org, client, owner):
    sweep = make_sweep(strategy="grid", trial_count=2, space={"epochs": {"values": [3, 7]}})
    client.force_login(owner)
    page = client.get(f"/o/{org.slug}/sweeps/{sweep.pk}/")
    assert [values for _trial, values, _score in page.context["rows"]] == [[3], [7]]
    assert client.post(f"/o/{org.slug}/sweeps/{sweep.pk}/cancel/").status_code == 302
    sweep.refresh_from_db()
    assert sweep.state == Sweep.State.CANCELLED


def test_a_gate_on_the_best_alias_does_not_stop_the_sweep_from_finishing(make_sweep, org):
    sweep = make_sweep(trial_count=1, space={"epochs": {"values": [1]}}, strategy="grid")
    version = ModelVersionFactory(organization=org, metrics={"val_accuracy": 0.5})
    model = version.registered_model
    model.promotion_gates = [{"alias": "best", "metric": "val_accuracy", "op": ">=", "value": 0.99}]
    model.save()
    Job.objects.filter(sweep=sweep).update(state=JobState.SUCCEEDED, output_model_version=version)
    assert sweeps_progress() == 1
    sweep.refresh_from_db()
    assert sweep.state == Sweep.State.SUCCEEDED and not ModelAlias.objects.exists()
