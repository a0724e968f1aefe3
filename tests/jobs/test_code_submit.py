"""Submitting a code package version as a job: through the jobs API and the version's Run page,
with the parameters checked against the package's schema field by field; another tenant's
package is a 404 and a key that may not submit jobs cannot."""

from __future__ import annotations

import zipfile

import pytest
from django.urls import reverse

from jobs.models import Job, JobState
from registry.management.commands.seed_code import example_folder, package_zip
from registry.models import CodePackageVersion
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


# A schema with every kind of input the Run form draws, and one it can only take as JSON.
WIDE_MANIFEST = """
[package]
name = "wide"
[entry]
train = "pkg.main:run"
[runtime]
name = "torch-2.13-py311"
[outputs]
model = true
[parameters]
type = "object"
required = ["epochs"]
additionalProperties = false
[parameters.properties.epochs]
type = "integer"
minimum = 1
default = 5
[parameters.properties.lr]
type = "number"
default = 0.1
[parameters.properties.note]
type = "string"
[parameters.properties.shuffle]
type = "boolean"
default = true
[parameters.properties.depth]
enum = [2, 4, 8]
default = 4
[parameters.properties.layers]
type = "array"
items = { type = "integer" }
default = [16, 8]
"""


@pytest.fixture
def wide_version(org, owner, tmp_path):
    path = tmp_path / "wide.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("factory.toml", WIDE_MANIFEST)
        archive.writestr("pkg/main.py", "def run():\n    pass\n")
    return code_package_version_create(
        organization=org, path=path, filename=path.name, actor=Actor(user=owner)
    )


@pytest.fixture
def page_dev(org, member_factory, client):
    client.force_login(member_factory(org, "developer"))
    return client


def _run_url(org, version) -> str:
    return reverse("jobs:code_run", args=[org.slug, version.package.name, version.number])


def test_the_run_form_is_drawn_from_the_package_schema_with_its_defaults(
    org, page_dev, wide_version
):
    html = page_dev.get(_run_url(org, wide_version)).content.decode()

    assert 'name="param_epochs" value="5"' in html and 'type="number"' in html
    assert 'name="param_lr" value="0.1"' in html
    assert 'name="param_note"' in html
    assert 'type="checkbox" name="param_shuffle"' in html and "checked" in html
    assert '<select name="param_depth"' in html and '<option value="4" selected>4</option>' in html
    assert "<textarea" in html and "[16, 8]</textarea>" in html  # an array: JSON
    assert 'name="resource_class"' in html and 'name="max_runtime_s"' in html
    assert 'name="dataset_version"' in html and 'name="output_model"' in html
    version_page = page_dev.get(
        reverse("registry:code_package_version", args=[org.slug, "wide", 1])
    )
    assert _run_url(org, wide_version) in version_page.content.decode()


def test_the_run_form_submits_the_job_and_redirects_to_it(org, page_dev, wide_version):
    response = page_dev.post(
        _run_url(org, wide_version),
        {
            "param_epochs": "3",
            "param_lr": "",
            "param_note": "first try",
            "param_depth": "8",
            "param_layers": "[32, 4]",
            "resource_class": "cpu",
            "max_runtime_s": "600",
            "output_model": "wide-model",
        },
    )

    job = Job.objects.get()
    assert response.status_code == 302, response.content.decode()
    assert response["Location"] == reverse("jobs:job", args=[org.slug, job.pk])
    assert job.code_package_version == wide_version and job.max_runtime_s == 600
    # The blank optional number is left to the code's default; the unticked box is false.
    assert job.parameters == {
        "epochs": 3,
        "note": "first try",
        "shuffle": False,
        "depth": 8,
        "layers": [32, 4],
    }
    assert job.output_model_name == "wide-model"


def test_the_run_form_names_the_bad_parameter_and_queues_nothing(org, page_dev, wide_version):
    response = page_dev.post(
        _run_url(org, wide_version),
        {
            "param_epochs": "0",
            "param_depth": "3",
            "param_layers": "[1, 2.5]",
            "resource_class": "cpu",
            "max_runtime_s": "600",
        },
    )
    assert response.status_code == 400 and not Job.objects.exists()
    form = response.context["form"]
    assert "param_depth" in form.errors  # not one of the enum's values
    broken = page_dev.post(
        _run_url(org, wide_version),
        {"param_epochs": "0", "param_layers": "[1,", "resource_class": "cpu", "max_runtime_s": 600},
    )
    assert "param_layers" in broken.context["form"].errors  # not JSON
    schema = page_dev.post(
        _run_url(org, wide_version),
        {
            "param_epochs": "0",
            "param_layers": "[1, 2.5]",
            "resource_class": "cpu",
            "max_runtime_s": 600,
        },
    )
    errors = schema.context["form"].errors
    assert schema.status_code == 400 and {"param_epochs", "param_layers"} <= set(errors), errors
    assert not Job.objects.exists()


def test_another_tenants_run_page_is_a_404(other_org, member_factory, client, wide_version, org):
    client.force_login(member_factory(other_org, "owner"))
    mine = reverse("jobs:code_run", args=[other_org.slug, "wide", 1])
    assert client.get(mine).status_code == 404
    assert client.post(mine, {"resource_class": "cpu", "max_runtime_s": 600}).status_code == 404
    assert client.get(_run_url(org, wide_version)).status_code == 404
    assert not Job.objects.exists()


def test_seeding_the_example_is_idempotent(org, owner):
    from django.core.management import call_command

    call_command("seed_code", org=org.slug)
    call_command("seed_code", org=org.slug)

    versions = CodePackageVersion.objects.for_organization(org)
    assert [(v.package.name, v.number) for v in versions] == [("tiny-cnn", 1)]
