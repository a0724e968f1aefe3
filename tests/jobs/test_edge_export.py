"""Edge export as a job of the pool: admission (which versions, whose, once, which scope), the
API and page that start it, and a real worker that exports a trained version, checks the
bundle and stores it beside the version, downloadable by the API, with lineage to it."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest
from django.test import Client
from django.urls import reverse

from jobs.models import TERMINAL_STATES, Job, JobState, ResourceClass
from jobs.recipes.tabular import TabularClassifier
from jobs.samples.tabular import write_tabular_sample
from jobs.services import JobOptions, export_job_submit
from registry.models import EdgeBundle
from registry.services import (
    edge_bundle_register,
    model_version_register,
    registered_model_create,
)
from registry.storage import get_storage
from tenants.actors import Actor
from tenants.errors import ConflictError, DomainError, PermissionDeniedError
from tenants.models import AuditEvent
from tenants.services import api_key_create
from tests.jobs.recipe_helpers import read_csv, recipe_context
from tests.processes import wait_for

e2e = pytest.mark.django_db(transaction=True)


def _cpu() -> ResourceClass:
    return ResourceClass.objects.get(name="cpu")


def _register(organization, owner, weights, config, *, recipe=TabularClassifier.name):
    registered = registered_model_create(
        organization=organization, name="churn", actor=Actor(user=owner)
    )
    return model_version_register(
        registered_model=registered,
        weights_path=weights,
        config=config,
        actor=Actor(user=owner),
        recipe_name=recipe,
    )


@pytest.fixture
def stored_version(org, owner, local_store, tmp_path, weights_bytes):
    """A tabular version with files (not a real model: enough for admission)."""
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights_bytes)
    return _register(org, owner, weights, {"recipe": TabularClassifier.name})


def _submit(organization, actor, version):
    return export_job_submit(
        organization=organization,
        actor=actor,
        model_version=version,
        options=JobOptions(resource_class=_cpu()),
    )


def _bundle_zip(path):
    with zipfile.ZipFile(path, "w") as bundle:
        for name in ("model.onnx", "preprocessing.json", "run.py", "README.md"):
            bundle.writestr(name, "x")
    return path


# Admission, against the database


def test_an_export_is_a_job_on_the_version_that_reads_no_dataset(org, owner, stored_version):
    job, created = _submit(org, Actor(user=owner), stored_version)
    assert created and job.kind == Job.Kind.EXPORT and job.state == JobState.QUEUED
    assert job.input_model_version == stored_version and job.input_dataset_version is None
    assert job.parameters == {"source": "churn v1"}


def test_a_version_no_built_in_recipe_made_is_not_exported(
    org, owner, local_store, tmp_path, weights_bytes
):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights_bytes)
    version = _register(org, owner, weights, {}, recipe="")
    with pytest.raises(DomainError, match="no edge export; the recipes that do"):
        _submit(org, Actor(user=owner), version)
    assert not Job.objects.filter(organization=org).exists()


def test_another_organizations_version_is_refused(org, other_org, member_factory, stored_version):
    stranger = member_factory(other_org, "owner")
    with pytest.raises(DomainError, match="this organization's own versions"):
        _submit(other_org, Actor(user=stranger), stored_version)
    assert not Job.objects.filter(organization=other_org).exists()


def test_a_version_is_exported_once(org, owner, stored_version, tmp_path):
    edge_bundle_register(
        model_version=stored_version,
        path=_bundle_zip(tmp_path / "edge.zip"),
        self_check={},
        actor=Actor(user=owner),
    )
    with pytest.raises(ConflictError, match="already exported; download its edge bundle"):
        _submit(org, Actor(user=owner), stored_version)


def test_an_export_needs_models_write_because_it_adds_to_the_version(org, owner, stored_version):
    key, _token = api_key_create(
        organization=org, name="ci", scopes=["jobs:write", "models:read"], actor=Actor(user=owner)
    )
    with pytest.raises(PermissionDeniedError, match="models:write"):
        _submit(org, Actor(api_key=key), stored_version)


def test_a_bundle_that_is_not_the_four_files_is_refused_and_nothing_is_stored(
    org, owner, stored_version, tmp_path
):
    path = tmp_path / "edge.zip"
    with zipfile.ZipFile(path, "w") as bundle:
        bundle.writestr("model.onnx", "x")
    with pytest.raises(DomainError, match=r"not \['README.md'"):
        edge_bundle_register(
            model_version=stored_version, path=path, self_check={}, actor=Actor(user=owner)
        )
    assert not EdgeBundle.objects.exists()


# API and page


def _edge_url(org, version):
    return reverse(
        "model-version-edge-bundle",
        kwargs={"org_slug": org.slug, "model_name": "churn", "number": version.number},
    )


def test_the_api_starts_an_export_and_refuses_a_dataset_beside_it(
    org, owner, stored_version, key_client_for, dataset_version
):
    client = key_client_for(owner, org)
    url = reverse("job-list", kwargs={"org_slug": org.slug})
    body = {"kind": "export", "model": {"model": "churn", "version": "1"}}
    refused = client.post(
        url,
        body
        | {"dataset": {"dataset": dataset_version.dataset.name, "number": dataset_version.number}},
        format="json",
    )
    assert refused.status_code == 400 and "reads no dataset" in refused.json()["detail"]
    made = client.post(url, body, format="json")
    assert made.status_code == 201, made.json()
    assert Job.objects.get(pk=made.json()["id"]).kind == Job.Kind.EXPORT
    assert client.get(_edge_url(org, stored_version)).status_code == 404


def test_the_version_page_offers_the_export_then_the_download(
    org, owner, stored_version, tmp_path, client
):
    client.force_login(owner)
    page = reverse(
        "registry:model_version", kwargs={"org_slug": org.slug, "name": "churn", "number": 1}
    )
    assert "Export for the edge (ONNX)" in client.get(page).content.decode()
    response = client.post(
        reverse(
            "jobs:model_version_export",
            kwargs={"org_slug": org.slug, "name": "churn", "number": 1},
        )
    )
    job = Job.objects.get(organization=org, kind=Job.Kind.EXPORT)
    assert response.status_code == 302 and response.url.endswith(f"/jobs/{job.pk}/")
    edge_bundle_register(
        model_version=stored_version,
        path=_bundle_zip(tmp_path / "edge.zip"),
        self_check={"samples": 16, "tolerance": "atol 0.0001 on probabilities"},
        actor=Actor(user=owner),
        source_job_id=job.pk,
    )
    shown = client.get(page).content.decode()
    assert "Download the edge bundle (ONNX)" in shown and "Export for the edge" not in shown
    assert f"job {job.pk}" in shown


# On a real pool worker


@pytest.fixture
def trained_version(pool, org, owner, tmp_path):
    """A tabular classifier trained here in a second, registered in the pool's storage."""
    dataset = tmp_path / "churn.csv"
    write_tabular_sample(dataset, rows=300, seed=1)
    ctx = recipe_context(
        TabularClassifier,
        tmp_path,
        dataset,
        {"target": "label", "epochs": 2, "hidden_sizes": [8]},
        seed=1,
    )
    TabularClassifier().train(ctx)
    config = json.loads((ctx.output_dir / "config.json").read_text())
    version = _register(org, owner, ctx.output_dir / "model.safetensors", config)
    rows = [
        {
            "age": int(row["age"]),
            "monthly_spend": float(row["monthly_spend"]) if row["monthly_spend"] else None,
            "tenure_months": int(row["tenure_months"]),
            "support_calls": int(row["support_calls"]),
            "plan": row["plan"],
            "region": row["region"],
        }
        for row in read_csv(dataset)[:5]
    ]
    return version, ctx.output_dir, rows


def _state(job: Job) -> str:
    job.refresh_from_db()
    return job.state


@e2e
def test_a_worker_exports_checks_and_stores_the_bundle_with_lineage_to_its_version(
    pool, org, owner, trained_version, key_client_for, tmp_path
):
    version, model_dir, rows = trained_version
    pool.start_worker("w1")
    job, _ = _submit(org, Actor(user=owner), version)
    try:
        wait_for(lambda: _state(job) in TERMINAL_STATES, timeout=180, what="the export to end")
    except AssertionError:
        print(pool.logs())
        raise
    assert job.state == JobState.SUCCEEDED, job.failure_reason
    bundle = EdgeBundle.objects.get(model_version=version)
    assert bundle.organization == org and bundle.source_job_id == job.pk
    assert bundle.self_check["max_difference"] < 1e-4
    assert bundle.storage_key.startswith(f"orgs/{org.pk}/models/")
    assert AuditEvent.objects.filter(organization=org, action="model.edge_export").exists()

    answer = key_client_for(owner, org).get(_edge_url(org, version))
    assert answer.status_code == 200
    entry = answer.json()
    assert entry["model_version"] == {"model": "churn", "number": version.number}
    assert entry["source_job"] == job.pk and entry["sha256"] == bundle.sha256
    assert entry["name"] == f"churn-v{version.number}-edge.zip"

    folder = tmp_path / "downloaded"
    folder.mkdir()
    with get_storage().open(bundle.storage_key) as stored, (folder / "edge.zip").open("wb") as out:
        out.write(stored.read())
    with zipfile.ZipFile(folder / "edge.zip") as archive:
        archive.extractall(folder)
    (folder / "inputs.json").write_text(json.dumps(rows))
    run = subprocess.run(
        [sys.executable, "-I", "run.py", "inputs.json"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    platform = TabularClassifier.online_predictor(model_dir)(rows)
    assert [o["label"] for o in json.loads(run.stdout)] == [o["label"] for o in platform]
    with pytest.raises(ConflictError):
        _submit(org, Actor(user=owner), version)
    client = Client()
    client.force_login(owner)
    job_page = client.get(reverse("jobs:job", kwargs={"org_slug": org.slug, "pk": job.pk}))
    assert "edge export" in job_page.content.decode()
    assert "Edge bundle: on" in job_page.content.decode()
