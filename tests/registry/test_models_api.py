"""Model registry through the API: safetensors versions, aliases behind gates, compare, lineage."""

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from registry.models import DatasetVersion, ModelVersion
from tenants.models import AuditEvent
from tests.factories import DatasetVersionFactory
from tests.registry.conftest import stored_files

pytestmark = pytest.mark.django_db


@pytest.fixture
def dev_client(org, member_factory, client_for):
    return client_for(member_factory(org, "developer"))


def _register(client, org, model, weights: bytes, **fields):
    data = {
        "weights": SimpleUploadedFile("model.safetensors", weights),
        "config": '{"layers": [3, 2]}',
    }
    data.update(fields)
    return client.post(
        f"/api/v1/orgs/{org.slug}/models/{model}/versions/", data, format="multipart"
    )


def _create_model(client, org, name="churn", **extra):
    response = client.post(
        f"/api/v1/orgs/{org.slug}/models/", {"name": name, **extra}, format="json"
    )
    assert response.status_code == 201, response.content
    return name


def test_register_a_version_from_safetensors(org, dev_client, local_store, weights_bytes):
    model = _create_model(dev_client, org)
    response = _register(
        dev_client, org, model, weights_bytes, metrics='{"accuracy": 0.91}', recipe_name="tabular"
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["number"] == 1 and body["metrics"] == {"accuracy": 0.91}
    assert body["input_signature"]["tensors"]["linear.weight"] == {"dtype": "F32", "shape": [2, 3]}
    assert sorted(a["name"] for a in body["artifacts"]) == ["config.json", "model.safetensors"]
    assert len(stored_files(local_store)) == 2
    assert all(key.startswith(f"orgs/{org.pk}/models/") for key in stored_files(local_store))


def test_a_pickle_is_never_accepted_as_weights(org, dev_client, local_store):
    import pickle

    model = _create_model(dev_client, org)
    response = _register(dev_client, org, model, pickle.dumps({"w": [1, 2, 3]}))
    assert response.status_code == 400 and response.json()["code"] == "invalid_artifact"
    assert stored_files(local_store) == [] and not ModelVersion.objects.exists()


def test_invalid_json_fields_are_field_errors(org, dev_client, local_store, weights_bytes):
    model = _create_model(dev_client, org)
    response = _register(dev_client, org, model, weights_bytes, metrics="{not json")
    assert response.status_code == 400 and "metrics" in response.json()["fields"]


def test_promotion_gate_guards_the_production_alias(org, dev_client, local_store, weights_bytes):
    gate = [{"alias": "production", "metric": "accuracy", "op": ">=", "value": 0.9}]
    model = _create_model(dev_client, org, promotion_gates=gate)
    _register(dev_client, org, model, weights_bytes, metrics='{"accuracy": 0.8}')
    _register(dev_client, org, model, weights_bytes, metrics='{"accuracy": 0.95}')
    url = f"/api/v1/orgs/{org.slug}/models/{model}/aliases/production/"

    refused = dev_client.put(url, {"version": 1}, format="json")
    assert refused.status_code == 409 and refused.json()["code"] == "promotion_gate_failed"
    assert "accuracy >= 0.9" in refused.json()["detail"]
    assert (
        dev_client.put(
            f"/api/v1/orgs/{org.slug}/models/{model}/aliases/staging/",
            {"version": 1},
            format="json",
        ).status_code
        == 200
    )

    promoted = dev_client.put(url, {"version": 2}, format="json")
    assert promoted.status_code == 200 and promoted.json()["version"] == 2
    event = AuditEvent.objects.get(action="model.alias_set", data__alias="production")
    assert event.data["to"] == 2 and event.data["from"] is None
    assert dev_client.get(f"/api/v1/orgs/{org.slug}/models/{model}/").json()["aliases"] == {
        "production": 2,
        "staging": 1,
    }


def test_bad_gates_are_field_errors(org, dev_client):
    model = _create_model(dev_client, org)
    response = dev_client.patch(
        f"/api/v1/orgs/{org.slug}/models/{model}/",
        {"promotion_gates": [{"alias": "production", "metric": "accuracy", "op": "~", "value": 1}]},
        format="json",
    )
    assert response.status_code == 400 and "promotion_gates" in response.json()["fields"]


def test_compare_versions_side_by_side(org, dev_client, local_store, weights_bytes):
    model = _create_model(dev_client, org)
    _register(
        dev_client, org, model, weights_bytes, metrics='{"accuracy": 0.8}', parameters='{"lr": 0.1}'
    )
    _register(
        dev_client,
        org,
        model,
        weights_bytes,
        metrics='{"accuracy": 0.9, "f1": 0.7}',
        parameters='{"lr": 0.01}',
    )
    body = dev_client.get(f"/api/v1/orgs/{org.slug}/models/{model}/compare/?versions=1,2").json()
    assert body["versions"] == [1, 2]
    assert body["metrics"] == {"accuracy": [0.8, 0.9], "f1": [None, 0.7]}
    assert body["parameters"] == {"lr": [0.1, 0.01]}


@pytest.mark.parametrize("query", ["", "?versions=", "?versions=1,two", "?versions=-1"])
def test_compare_with_a_bad_versions_parameter_is_a_field_error_not_a_dataset_error(
    org, dev_client, query
):
    model = _create_model(dev_client, org)
    response = dev_client.get(f"/api/v1/orgs/{org.slug}/models/{model}/compare/{query}")
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid"
    assert "versions" in body["fields"]


def test_lineage_from_dataset_to_model_to_predictions(org, dev_client, local_store, weights_bytes):
    source = DatasetVersionFactory(organization=org)
    model = _create_model(dev_client, org)
    trained = _register(
        dev_client,
        org,
        model,
        weights_bytes,
        trained_on=f'[{{"dataset": "{source.dataset.name}", "number": {source.number}}}]',
    )
    assert trained.status_code == 201, trained.content
    version = ModelVersion.objects.get()
    version.source_job_id = 41
    version.save()
    predictions = DatasetVersionFactory(
        organization=org,
        derived_from_model_version=version,
        derived_from_dataset_version=source,
        source_job_id=42,
    )

    graph = dev_client.get(
        f"/api/v1/orgs/{org.slug}/datasets/{source.dataset.name}/versions/{source.number}/lineage/"
    ).json()
    ids = {node["id"] for node in graph["nodes"]}
    assert {
        f"dataset_version:{source.pk}",
        "job:41",
        f"model_version:{version.pk}",
        "job:42",
        f"dataset_version:{predictions.pk}",
    } <= ids
    assert {"from": f"dataset_version:{source.pk}", "to": "job:41", "relation": "trained"} in graph[
        "edges"
    ]
    assert {"from": "job:41", "to": f"model_version:{version.pk}", "relation": "produced"} in graph[
        "edges"
    ]

    upstream = dev_client.get(
        f"/api/v1/orgs/{org.slug}/datasets/{predictions.dataset.name}/versions/{predictions.number}/lineage/"
    ).json()
    assert f"dataset_version:{source.pk}" in {node["id"] for node in upstream["nodes"]}


def test_lineage_cannot_point_at_another_organizations_dataset(
    org, other_org, dev_client, local_store, weights_bytes
):
    foreign = DatasetVersionFactory(organization=other_org)
    model = _create_model(dev_client, org)
    response = _register(
        dev_client,
        org,
        model,
        weights_bytes,
        trained_on=f'[{{"dataset": "{foreign.dataset.name}", "number": {foreign.number}}}]',
    )
    assert response.status_code == 404
    assert not DatasetVersion.objects.filter(organization=org).exists()
