"""Dataset uploads through the API: versions, profiles, bad input leaving nothing behind."""

import hashlib
import io
import urllib.request
from datetime import timedelta
from unittest import mock
from urllib.parse import urlsplit

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import override_settings
from django.utils import timezone

from registry.models import DatasetVersion, PendingUpload, StorageAccount
from registry.storage import get_storage
from tenants.models import AuditEvent
from tests.registry.conftest import check_uploads, post_presigned, stored_files, zip_bytes

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
    answered = first.json()
    assert (answered["number"], answered["state"], answered["row_count"]) == (1, "checking", None)
    assert answered["profile"] == {} and answered["rejection_reason"] == ""

    check_uploads()

    body = dev_client.get(f"/api/v1/orgs/{org.slug}/datasets/{name}/versions/1/").json()
    assert (body["number"], body["format"], body["row_count"]) == (1, "csv", 3)
    assert (body["state"], body["check_progress"]) == ("ready", 1.0)
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
    assert AuditEvent.objects.filter(organization=org, action="dataset.version_ready").count() == 1


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
def test_bad_uploads_are_refused_and_leave_nothing_behind(
    org, dev_client, local_store, content, filename, extra, message
):
    """What the file's ends give away is a 400 at once; the rest, the check's rejection. Either
    way no object and no usable version is left, and the reason is the same."""
    name = _create_dataset(dev_client, org)
    response = _upload(dev_client, org, name, content, filename, **extra)
    if response.status_code == 400:
        assert response.json()["code"] == "invalid_dataset"
        reason = response.json()["detail"]
        assert not DatasetVersion.objects.exists()
    else:
        assert response.status_code == 201, response.content
        [rejected] = check_uploads()
        assert (rejected.state, rejected.storage_key) == ("rejected", None)
        reason = rejected.rejection_reason
    assert message.lower() in reason.lower()
    assert stored_files(local_store) == []
    assert not StorageAccount.objects.filter(organization=org, used_bytes__gt=0).exists()


def test_npz_with_object_arrays_is_rejected_by_the_check(org, dev_client, local_store):
    buffer = io.BytesIO()
    np.savez(buffer, x=np.array([{"a": 1}, None], dtype=object))
    name = _create_dataset(dev_client, org)
    response = _upload(dev_client, org, name, buffer.getvalue(), "arrays.npz")
    assert response.status_code == 201, response.content
    [rejected] = check_uploads()
    assert rejected.state == "rejected" and "unpickle" in rejected.rejection_reason
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


def _start_upload(client, org, name, size):
    started = client.post(
        f"/api/v1/orgs/{org.slug}/datasets/{name}/uploads/",
        {"filename": "big.csv", "size_bytes": size},
        format="json",
    )
    assert started.status_code == 201, started.content
    return started.json()


def test_presigned_upload_then_finalize(org, dev_client, local_store, csv_bytes, client):
    name = _create_dataset(dev_client, org)
    started = _start_upload(dev_client, org, name, len(csv_bytes))
    assert (started["size_bytes"], started["fields"]) == (len(csv_bytes), {})
    upload_key = PendingUpload.objects.get().storage_key
    assert post_presigned(client, started["url"], started["fields"], csv_bytes) == 204
    finalize_url = f"/api/v1/orgs/{org.slug}/datasets/{name}/uploads/{started['id']}/finalize/"
    finalized = dev_client.post(finalize_url)
    assert finalized.status_code == 201, finalized.content
    assert finalized.json()["state"] == "checking"
    assert not PendingUpload.objects.exists()
    [checked] = check_uploads()
    assert (checked.state, checked.row_count) == ("ready", 3)
    assert checked.sha256 == hashlib.sha256(csv_bytes).hexdigest()
    assert dev_client.post(finalize_url).status_code == 404
    version = DatasetVersion.objects.get()
    assert version.storage_key.startswith(f"orgs/{org.pk}/datasets/")
    assert stored_files(local_store) == [version.storage_key]
    assert upload_key != version.storage_key
    assert StorageAccount.objects.get(organization=org).used_bytes == len(csv_bytes)


def test_starting_an_upload_needs_its_exact_size_within_the_limit(org, dev_client, local_store):
    name = _create_dataset(dev_client, org)
    url = f"/api/v1/orgs/{org.slug}/datasets/{name}/uploads/"
    missing = dev_client.post(url, {"filename": "big.csv"}, format="json")
    with override_settings(DATASET_MAX_UPLOAD_BYTES=10):
        over = dev_client.post(url, {"filename": "big.csv", "size_bytes": 11}, format="json")
    assert (missing.status_code, missing.json()["fields"]) == (400, {"size_bytes": mock.ANY})
    assert (over.status_code, over.json()["code"]) == (400, "invalid_dataset")
    assert not PendingUpload.objects.exists()


def test_a_write_racing_the_finalize_does_not_reach_the_version(
    org, dev_client, local_store, csv_bytes, client, monkeypatch
):
    """The check hashes and inspects finalize's own copy, so bytes swapped into the upload's key
    after the copy (its URL is still valid on S3) never become the version."""
    name = _create_dataset(dev_client, org)
    started = _start_upload(dev_client, org, name, len(csv_bytes))
    assert post_presigned(client, started["url"], started["fields"], csv_bytes) == 204
    storage = get_storage()
    copy = storage.copy

    def copy_then_overwrite(source_key, target_key):
        copy(source_key, target_key)
        storage.save(source_key, io.BytesIO(b"x,y\n" + b"1,2\n" * 1000))

    monkeypatch.setattr(storage, "copy", copy_then_overwrite)
    finalized = dev_client.post(
        f"/api/v1/orgs/{org.slug}/datasets/{name}/uploads/{started['id']}/finalize/"
    )

    assert finalized.status_code == 201, finalized.content
    [checked] = check_uploads()
    assert (checked.state, checked.row_count) == ("ready", 3)
    assert checked.sha256 == hashlib.sha256(csv_bytes).hexdigest()
    assert (local_store / checked.storage_key).read_bytes() == csv_bytes


def test_an_upload_of_another_size_than_declared_is_refused_at_finalize_and_discarded(
    org, dev_client, local_store, csv_bytes
):
    """An object of the wrong size (an upload started before sizes were declared, or a store
    that ignored the bound) is refused and discarded, never inspected."""
    name = _create_dataset(dev_client, org)
    started = _start_upload(dev_client, org, name, len(csv_bytes) + 1)
    get_storage().save(PendingUpload.objects.get().storage_key, io.BytesIO(csv_bytes))

    finalized = dev_client.post(
        f"/api/v1/orgs/{org.slug}/datasets/{name}/uploads/{started['id']}/finalize/"
    )

    assert finalized.status_code == 400
    assert "were declared" in finalized.json()["detail"]
    assert not PendingUpload.objects.exists() and not DatasetVersion.objects.exists()
    assert stored_files(local_store) == []


def test_a_finalized_upload_the_check_rejects_leaves_neither_the_copy_nor_the_upload(
    org, dev_client, local_store, client
):
    bad = b"a,b\n1,2\n3,4,5\n"
    name = _create_dataset(dev_client, org)
    started = _start_upload(dev_client, org, name, len(bad))
    assert post_presigned(client, started["url"], started["fields"], bad) == 204

    finalized = dev_client.post(
        f"/api/v1/orgs/{org.slug}/datasets/{name}/uploads/{started['id']}/finalize/"
    )

    assert finalized.status_code == 201, finalized.content
    [rejected] = check_uploads()
    assert rejected.state == "rejected" and "columns" in rejected.rejection_reason
    assert not PendingUpload.objects.exists()
    assert stored_files(local_store) == []
    assert StorageAccount.objects.get(organization=org).used_bytes == 0


def test_download_link_serves_the_bytes_once_checked(
    org, dev_client, local_store, csv_bytes, client
):
    name = _create_dataset(dev_client, org)
    _upload(dev_client, org, name, csv_bytes, "people.csv")
    download = f"/api/v1/orgs/{org.slug}/datasets/{name}/versions/1/download/"
    early = dev_client.get(download)
    assert (early.status_code, early.json()["code"]) == (409, "dataset_version_not_ready")
    check_uploads()
    link = dev_client.get(download).json()
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
    assert check_uploads()[0].state == "ready"
    link = dev_client.get(f"/api/v1/orgs/{org.slug}/datasets/{name}/versions/1/download/").json()
    with urllib.request.urlopen(link["url"], timeout=10) as response:  # noqa: S310  the test S3 server
        assert response.read() == csv_bytes
    version = DatasetVersion.objects.get()
    assert s3_storage.size(version.storage_key) == len(csv_bytes)


def test_a_finalize_claimed_by_a_crashed_request_is_refused_until_the_claim_lapses(
    org, dev_client, local_store, csv_bytes, client, monkeypatch
):
    """A finalize that died mid-copy leaves its claim behind: another finalize is told so at
    once, without copying; once the claim lapses, a retry finalizes the upload."""
    name = _create_dataset(dev_client, org)
    started = _start_upload(dev_client, org, name, len(csv_bytes))
    assert post_presigned(client, started["url"], started["fields"], csv_bytes) == 204
    storage = get_storage()
    copies = []
    copy = storage._copy
    monkeypatch.setattr(storage, "_copy", lambda *keys: copies.append(keys) or copy(*keys))
    finalize_url = f"/api/v1/orgs/{org.slug}/datasets/{name}/uploads/{started['id']}/finalize/"
    claimed_until = timezone.now() + timedelta(minutes=5)
    PendingUpload.objects.update(finalize_claimed_until=claimed_until)

    refused = dev_client.post(finalize_url)

    assert (refused.status_code, refused.json().get("code")) == (409, "upload_being_finalized")
    assert copies == [] and PendingUpload.objects.get().finalize_claimed_until == claimed_until
    PendingUpload.objects.update(finalize_claimed_until=timezone.now() - timedelta(seconds=1))
    retried = dev_client.post(finalize_url)
    assert retried.status_code == 201, retried.content
    assert len(copies) == 1 and DatasetVersion.objects.get().storage_key == copies[0][1]


def test_a_finalize_refused_before_the_bytes_arrived_can_be_retried(
    org, dev_client, local_store, csv_bytes, client
):
    """A refusal the user can act on releases the claim: finalize too early, upload, finalize."""
    name = _create_dataset(dev_client, org)
    started = _start_upload(dev_client, org, name, len(csv_bytes))
    finalize_url = f"/api/v1/orgs/{org.slug}/datasets/{name}/uploads/{started['id']}/finalize/"

    early = dev_client.post(finalize_url)

    assert early.status_code == 400 and "Nothing was uploaded" in early.json()["detail"]
    assert PendingUpload.objects.get().finalize_claimed_until is None
    assert post_presigned(client, started["url"], started["fields"], csv_bytes) == 204
    assert dev_client.post(finalize_url).status_code == 201


def test_a_finalize_over_the_quota_keeps_the_upload_for_a_retry(
    org, dev_client, local_store, csv_bytes, client
):
    """The quota shrank after the upload started: finalize is refused and its copy deleted, but
    the upload stays, so the user can free space and finalize it again."""
    name = _create_dataset(dev_client, org)
    started = _start_upload(dev_client, org, name, len(csv_bytes))
    assert post_presigned(client, started["url"], started["fields"], csv_bytes) == 204
    finalize_url = f"/api/v1/orgs/{org.slug}/datasets/{name}/uploads/{started['id']}/finalize/"
    StorageAccount.objects.update_or_create(
        organization=org, defaults={"quota_bytes": len(csv_bytes) - 1}
    )

    refused = dev_client.post(finalize_url)

    assert (refused.status_code, refused.json().get("code")) == (400, "storage_quota_exceeded")
    upload = PendingUpload.objects.get()
    assert upload.finalize_claimed_until is None
    assert stored_files(local_store) == [upload.storage_key]
    StorageAccount.objects.filter(organization=org).update(quota_bytes=len(csv_bytes))
    assert dev_client.post(finalize_url).status_code == 201
