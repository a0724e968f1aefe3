"""Dataset uploads through the API: versions, profiles, bad input leaving nothing behind."""

import io
import urllib.request
from urllib.parse import urlsplit

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import override_settings

from registry.models import DatasetVersion, PendingUpload, StorageAccount
from tenants.models import AuditEvent
from tests.registry.conftest import stored_files, zip_bytes

pytestmark = pytest.mark.django_db


@pytest.fixture
def dev_client(org, member_factory, client_for):
    return client_for(member_factory(org, "developer"))


def _local_path(url: str) -> str:
    """The path (and query) of a local-storage signed URL, to call it through the test client."""
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def _create_dataset(client, org, name="customers"):
    response = client.post(f"/api/v1/orgs/{org.slug}/datasets/", {"name": name}, format="json")
    assert response.status_code == 201, response.content
    return name


def _upload(client, org, name, content: bytes, filename="data.csv", **extra):
    return client.post(
        f"/api/v1/orgs/{org.slug}/datasets/{name}/versions/",
        {"file": SimpleUploadedFile(filename, content), **extra},
        format="multipart",
    )


def test_upload_creates_numbered_versions_with_schema_profile_and_preview(
    org, dev_client, local_store, csv_bytes
):
    name = _create_dataset(dev_client, org)
    first = _upload(dev_client, org, name, csv_bytes)
    assert first.status_code == 201, first.content
    body = first.json()
    assert (body["number"], body["format"], body["row_count"]) == (1, "csv", 3)
    assert [c["name"] for c in body["schema"]] == ["age", "city", "score"]
    assert body["profile"]["age"]["mean"] == pytest.approx((31 + 45 + 27) / 3)
    assert body["profile"]["score"]["nulls"] == 1
    assert body["preview"][0]["city"] == "Paris"
    assert _upload(dev_client, org, name, csv_bytes).json()["number"] == 2

    version = DatasetVersion.objects.get(dataset__name=name, number=1)
    assert version.storage_key.startswith(f"orgs/{org.pk}/datasets/")
    assert (local_store / version.storage_key).read_bytes() == csv_bytes
    assert StorageAccount.objects.get(organization=org).used_bytes == 2 * len(csv_bytes)
    assert AuditEvent.objects.filter(organization=org, action="dataset.version_create").count() == 2


@pytest.mark.parametrize(
    ("content", "filename", "extra", "message"),
    [
        (b"a,b\n1,2\n3,4,5\n", "bad.csv", {}, "Row"),
        (b"a,b\n1,2\n", "data.csv", {"format": "parquet"}, "Parquet"),
        (zip_bytes({"../evil/x.png": b"\x89PNG"}), "imgs.zip", {}, ".."),
        (b"\x00\x01\x02 not data at all \xff\xfe", "data.bin", {}, "CSV"),
    ],
    ids=["inconsistent-csv", "lying-format", "zip-traversal", "garbage"],
)
def test_bad_uploads_are_400_and_leave_nothing_behind(
    org, dev_client, local_store, content, filename, extra, message
):
    name = _create_dataset(dev_client, org)
    response = _upload(dev_client, org, name, content, filename, **extra)
    assert response.status_code == 400, response.content
    assert response.json()["code"] == "invalid_dataset"
    assert message.lower() in response.json()["detail"].lower()
    assert not DatasetVersion.objects.exists()
    assert stored_files(local_store) == []


def test_npz_with_object_arrays_is_refused(org, dev_client, local_store):
    buffer = io.BytesIO()
    np.savez(buffer, x=np.array([{"a": 1}, None], dtype=object))
    name = _create_dataset(dev_client, org)
    response = _upload(dev_client, org, name, buffer.getvalue(), "arrays.npz")
    assert response.status_code == 400 and "unpickle" in response.json()["detail"]
    assert stored_files(local_store) == []


def test_upload_over_the_size_limit_is_refused_before_reading(
    org, dev_client, local_store, csv_bytes
):
    name = _create_dataset(dev_client, org)
    with override_settings(DATASET_MAX_UPLOAD_BYTES=10):
        response = _upload(dev_client, org, name, csv_bytes * 50_000)
    assert response.status_code == 400 and "limit" in response.json()["detail"]
    assert stored_files(local_store) == []


def test_storage_quota_is_enforced(org, dev_client, local_store, csv_bytes):
    name = _create_dataset(dev_client, org)
    with override_settings(STORAGE_QUOTA_DEFAULT_BYTES=len(csv_bytes) + 5):
        assert _upload(dev_client, org, name, csv_bytes).status_code == 201
        response = _upload(dev_client, org, name, csv_bytes)
    assert response.status_code == 400 and response.json()["code"] == "storage_quota_exceeded"
    assert DatasetVersion.objects.count() == 1 and len(stored_files(local_store)) == 1


def test_presigned_upload_then_finalize(org, dev_client, local_store, csv_bytes, client):
    name = _create_dataset(dev_client, org)
    started = dev_client.post(
        f"/api/v1/orgs/{org.slug}/datasets/{name}/uploads/",
        {"filename": "big.csv", "size_bytes": len(csv_bytes)},
        format="json",
    )
    assert started.status_code == 201, started.content
    put = client.generic("PUT", _local_path(started.json()["upload_url"]), csv_bytes)
    assert put.status_code == 200, put.content
    finalize_url = (
        f"/api/v1/orgs/{org.slug}/datasets/{name}/uploads/{started.json()['id']}/finalize/"
    )
    finalized = dev_client.post(finalize_url)
    assert finalized.status_code == 201, finalized.content
    assert finalized.json()["row_count"] == 3
    assert not PendingUpload.objects.exists()
    assert dev_client.post(finalize_url).status_code == 404


def test_download_link_serves_the_bytes(org, dev_client, local_store, csv_bytes, client):
    name = _create_dataset(dev_client, org)
    _upload(dev_client, org, name, csv_bytes, "people.csv")
    link = dev_client.get(f"/api/v1/orgs/{org.slug}/datasets/{name}/versions/1/download/").json()
    assert link["sha256"] and link["name"] == "people.csv"
    response = client.get(_local_path(link["url"]))
    assert response.status_code == 200
    assert b"".join(response.streaming_content) == csv_bytes
    assert "people.csv" in response["Content-Disposition"]


def test_deleting_a_dataset_frees_its_storage(
    org, dev_client, local_store, csv_bytes, django_capture_on_commit_callbacks
):
    name = _create_dataset(dev_client, org)
    _upload(dev_client, org, name, csv_bytes)
    with django_capture_on_commit_callbacks(execute=True):
        assert dev_client.delete(f"/api/v1/orgs/{org.slug}/datasets/{name}/").status_code == 204
    assert stored_files(local_store) == []
    assert StorageAccount.objects.get(organization=org).used_bytes == 0


def test_upload_to_s3_and_fetch_the_presigned_download_over_http(
    org, dev_client, s3_storage, csv_bytes
):
    name = _create_dataset(dev_client, org)
    created = _upload(dev_client, org, name, csv_bytes, "s3.csv")
    assert created.status_code == 201, created.content
    link = dev_client.get(f"/api/v1/orgs/{org.slug}/datasets/{name}/versions/1/download/").json()
    with urllib.request.urlopen(link["url"], timeout=10) as response:  # noqa: S310  the test S3 server
        assert response.read() == csv_bytes
    version = DatasetVersion.objects.get()
    assert s3_storage.size(version.storage_key) == len(csv_bytes)
