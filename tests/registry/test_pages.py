"""Registry pages: lists, version details with profile and lineage, promotion with gates."""

import pytest
from django.urls import reverse

from registry.models import Dataset, ModelAlias
from tests.factories import (
    DatasetFactory,
    DatasetVersionFactory,
    ModelVersionFactory,
    RegisteredModelFactory,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def dev(org, member_factory, client):
    user = member_factory(org, "developer")
    client.force_login(user)
    return client


def test_create_a_dataset_from_the_page_and_see_its_upload_form(org, dev):
    response = dev.post(
        reverse("registry:datasets", args=[org.slug]), {"name": "churn", "description": "q3"}
    )
    assert response["Location"] == reverse("registry:dataset", args=[org.slug, "churn"])
    page = dev.get(response["Location"])
    assert (
        f'data-upload-url="/api/v1/orgs/{org.slug}/datasets/churn/versions/"'.encode()
        in page.content
    )
    assert b"<progress" in page.content
    assert Dataset.objects.get(organization=org).description == "q3"


def test_bad_dataset_name_keeps_input_and_explains(org, dev):
    response = dev.post(
        reverse("registry:datasets", args=[org.slug]), {"name": "Bad Name!", "description": "kept"}
    )
    assert response.status_code == 400
    assert b"lowercase" in response.content and b"kept" in response.content


def test_version_page_shows_profile_preview_and_lineage(org, dev):
    version = DatasetVersionFactory(
        organization=org,
        schema=[{"name": "age", "dtype": "int64", "nullable": False}],
        profile={"age": {"count": 2, "nulls": 0, "mean": 38.0, "std": 9.9, "min": 31, "max": 45}},
        preview=[{"age": 31}, {"age": 45}],
    )
    model_version = ModelVersionFactory(organization=org)
    model_version.trained_on.add(version)
    page = dev.get(
        reverse("registry:dataset_version", args=[org.slug, version.dataset.name, version.number])
    )
    assert page.status_code == 200
    html = page.content.decode()
    assert "38.0000" in html and "<td>45</td>" in html
    assert (
        reverse(
            "registry:model_version",
            args=[org.slug, model_version.registered_model.name, model_version.number],
        )
        in html
    )


def test_promotion_form_reports_a_failed_gate(org, dev):
    low = ModelVersionFactory(organization=org, metrics={"accuracy": 0.5})
    model = low.registered_model
    model.promotion_gates = [
        {"alias": "production", "metric": "accuracy", "op": ">=", "value": 0.9}
    ]
    model.save()
    url = reverse("registry:model", args=[org.slug, model.name])
    response = dev.post(url, {"alias": "production", "version": low.number})
    assert response.status_code == 400 and b"accuracy &gt;= 0.9" in response.content
    assert not ModelAlias.objects.exists()
    high = ModelVersionFactory(organization=org, registered_model=model, metrics={"accuracy": 0.95})
    assert dev.post(url, {"alias": "production", "version": high.number}).status_code == 302
    assert ModelAlias.objects.get().version == high


def test_compare_on_the_model_page(org, dev):
    first = ModelVersionFactory(organization=org, metrics={"accuracy": 0.5}, parameters={"lr": 0.1})
    ModelVersionFactory(
        organization=org,
        registered_model=first.registered_model,
        number=first.number + 1,
        metrics={"accuracy": 0.7},
    )
    page = dev.get(
        reverse("registry:model", args=[org.slug, first.registered_model.name]),
        {"compare": [first.number, first.number + 1]},
    )
    assert page.context["comparison"]["metrics"] == {"accuracy": [0.5, 0.7]}


def test_model_page_puts_each_metric_in_its_column(org, dev):
    first = ModelVersionFactory(organization=org, metrics={"accuracy": 0.5, "loss": 0.25})
    ModelVersionFactory(
        organization=org,
        registered_model=first.registered_model,
        number=first.number + 1,
        metrics={"loss": 0.125},
    )
    html = dev.get(reverse("registry:model", args=[org.slug, first.registered_model.name]))
    html = html.content.decode()
    assert "<th>accuracy</th><th>loss</th>" in html
    # Newest first: the second version has no accuracy, so its first metric cell is empty.
    assert "<td></td><td>0.1250</td>" in html and "<td>0.5000</td><td>0.2500</td>" in html


@pytest.mark.parametrize(("path", "factory"), [("datasets", "dataset"), ("models", "model")])
def test_registry_lists_paginate_and_find_by_name(org, owner, client_for, path, factory):
    make = DatasetFactory if factory == "dataset" else RegisteredModelFactory
    for n in range(55):
        make(organization=org, name=f"{factory}-{n:02d}")
    make(organization=org, name="fraud-signals")
    client = client_for(owner)
    first = client.get(f"/o/{org.slug}/{path}/").content.decode()
    assert f"{factory}-00" in first and f"{factory}-54" not in first and "Page 1 of 2" in first
    assert f"{factory}-54" in client.get(f"/o/{org.slug}/{path}/?page=2").content.decode()
    found = client.get(f"/o/{org.slug}/{path}/?q=fraud").content.decode()
    assert "fraud-signals" in found and f"{factory}-00" not in found
    assert "No " in client.get(f"/o/{org.slug}/{path}/?q=nothing-like-it").content.decode()
