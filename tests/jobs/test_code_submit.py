"""Submitting a code package version as a job: through the jobs API and the version's Run page,
with the parameters checked against the package's schema field by field; another tenant's
package is a 404 and a key that may not submit jobs cannot."""

from __future__ import annotations

import pytest

from jobs.models import Job, JobState
from registry.management.commands.seed_code import example_folder, package_zip
from registry.services import code_package_version_create
from tenants.actors import Actor
from tests.factories import DatasetVersionFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def example_version(org, owner, tmp_path):
    """The example package (examples/tiny-cnn) uploaded to `org` as its owner."""
    path = package_zip(example_folder(), tmp_path / "tiny-cnn.zip")
    return code_package_version_create(
        organization=org, path=path, filename=path.name, actor=Actor(user=owner)
    )


@pytest.fixture
def dev(org, member_factory, client_for):
    return client_for(member_factory(org, "developer"))


def _jobs_url(org) -> str:
    return f"/api/v1/orgs/{org.slug}/jobs/"


def test_the_example_archive_uploads_and_its_manifest_parses(example_version):
    manifest = example_version.manifest
    assert example_version.package.name == "tiny-cnn" and example_version.number == 1
    assert manifest["entry"]["train"] == "tinycnn.train:run"
    assert manifest["runtime"]["name"] == "torch-2.13-py311"
    assert manifest["outputs"] == {"model": True, "dataset": False}
    properties = manifest["parameters"]["properties"]
    assert properties["steps"]["default"] == 200
    assert properties["optimizer"]["enum"] == ["adam", "sgd"]


def test_a_code_package_version_is_submitted_through_the_jobs_api(org, dev, example_version):
    response = dev.post(
        _jobs_url(org),
        {
            "code_package": "tiny-cnn",
            "code_package_version": 1,
            "parameters": {"steps": 20, "optimizer": "sgd"},
            "max_runtime_s": 600,
            "labels": {"project": "bars"},
        },
        format="json",
        HTTP_IDEMPOTENCY_KEY="run-1",
    )

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["code_package"] == {"package": "tiny-cnn", "number": 1}
    assert (body["recipe"], body["recipe_version"]) == ("code:tiny-cnn", "v1")
    assert body["state"] == JobState.QUEUED and body["dataset"] is None
    assert body["estimated_max_cost"]["currency"]
    job = Job.objects.get(pk=body["id"])
    assert job.code_package_version == example_version
    assert job.runtime == "torch-2.13-py311" and job.output_model_name == "tiny-cnn"
    assert job.parameters == {"steps": 20, "optimizer": "sgd"}
    again = dev.post(
        _jobs_url(org),
        {"code_package": "tiny-cnn", "code_package_version": 1},
        format="json",
        HTTP_IDEMPOTENCY_KEY="run-1",
    )
    assert again.status_code == 200 and again.json()["id"] == job.pk
    listed = dev.get(_jobs_url(org)).json()["results"]
    assert listed[0]["code_package"] == {"package": "tiny-cnn", "number": 1}
    assert dev.get(f"{_jobs_url(org)}{job.pk}/").json()["code_package"]["package"] == "tiny-cnn"


def test_a_code_package_job_may_read_a_dataset_version(org, dev, example_version):
    dataset = DatasetVersionFactory(organization=org)
    response = dev.post(
        _jobs_url(org),
        {
            "code_package": "tiny-cnn",
            "code_package_version": 1,
            "dataset": {"dataset": dataset.dataset.name, "number": dataset.number},
        },
        format="json",
    )
    assert response.status_code == 201, response.content
    assert response.json()["dataset"] == {
        "dataset": dataset.dataset.name,
        "number": dataset.number,
    }


@pytest.mark.parametrize(
    ("extra", "fields"),
    [
        ({"parameters": {"steps": 0}}, {"parameters.steps"}),
        (
            {"parameters": {"optimizer": "lbfgs", "augment": "yes"}},
            {"parameters.optimizer", "parameters.augment"},
        ),
        ({"parameters": {"unknown": 1}}, {"parameters"}),
        ({"code_package_version": 9}, {"code_package_version"}),
        ({"code_package_version": None}, {"code_package_version"}),
        ({"recipe": "tabular-classifier"}, {"recipe"}),
        ({"kind": "infer"}, {"kind"}),
        ({"model": {"model": "m", "version": "1"}}, {"model"}),
        ({"output_model": "../escape"}, {"output_model"}),
    ],
)
def test_bad_code_submissions_name_their_fields_and_queue_nothing(
    org, dev, example_version, extra, fields
):
    body = {"code_package": "tiny-cnn", "code_package_version": 1, **extra}
    if extra.get("code_package_version", 1) is None:
        del body["code_package_version"]
    response = dev.post(_jobs_url(org), body, format="json")

    assert response.status_code in (400, 404), response.content
    assert fields <= set(response.json().get("fields", {})), response.json()
    assert not Job.objects.exists()


def test_a_recipe_job_without_a_dataset_is_still_a_400_naming_it(org, dev):
    response = dev.post(
        _jobs_url(org),
        {"recipe": "tabular-classifier", "parameters": {"target": "x"}},
        format="json",
    )
    assert response.status_code == 400 and "dataset" in response.json()["fields"]


def test_another_tenants_package_version_is_a_404_like_a_missing_one(
    other_org, member_factory, client_for, example_version
):
    stranger = client_for(member_factory(other_org, "owner"))
    body = {"code_package": "tiny-cnn", "code_package_version": 1}

    theirs = stranger.post(_jobs_url(other_org), body, format="json")
    missing = stranger.post(
        _jobs_url(other_org), {**body, "code_package": "no-such"}, format="json"
    )

    assert theirs.status_code == missing.status_code == 404, theirs.content
    assert theirs.json()["fields"] == missing.json()["fields"]
    assert "tiny-cnn" not in str(missing.json())
    assert not Job.objects.exists()


def test_a_key_without_jobs_write_cannot_submit_a_code_package(
    org, owner, key_client_for, example_version
):
    reader = key_client_for(owner, org, scopes=["jobs:read", "code:read", "code:write"])
    response = reader.post(
        _jobs_url(org), {"code_package": "tiny-cnn", "code_package_version": 1}, format="json"
    )
    assert response.status_code == 403 and not Job.objects.exists()
    writer = key_client_for(owner, org, scopes=["jobs:write"])
    response = writer.post(
        _jobs_url(org), {"code_package": "tiny-cnn", "code_package_version": 1}, format="json"
    )
    assert response.status_code == 201, response.content
