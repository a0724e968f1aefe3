"""Exploits against presigned uploads, sent through the API as a tenant would, on both storage
backends: overwrite a finalized version's bytes through its old upload URL, and send more bytes
than were declared. Before the fix the first replaced the version's bytes (unbilled, unchecked,
no longer matching the sha256 shown) and the second was stored."""

import hashlib
import threading
import urllib.request
from datetime import timedelta
from urllib.parse import urlsplit

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test import override_settings
from django.utils import timezone
from rest_framework.test import APIClient

from registry.models import DatasetVersion, PendingUpload, StorageAccount
from tests.registry.conftest import check_uploads, post_presigned

pytestmark = pytest.mark.django_db

BACKENDS = ["local", "s3"]
CHECKED = b"age,city,score\n31,Paris,0.5\n45,Lyon,0.75\n27,Paris,0.1\n"
POISON = b"age,city,score\n" + b"99,Nowhere,9.9\n" * 10_000


@pytest.fixture(params=BACKENDS)
def storage(request):
    return request.getfixturevalue(f"{request.param}_storage")


@pytest.fixture
def attacker(org, member_factory, key_client_for):
    """A developer's API key: allowed to upload, nothing more."""
    return key_client_for(member_factory(org, "developer"), org)


def _post_file(client, started: dict, body: bytes) -> int:
    return post_presigned(client, started["url"], started["fields"], body)


def _get(client, url: str) -> bytes:
    parts = urlsplit(url)
    if parts.path.startswith("/storage/local/"):
        return b"".join(client.get(parts.path).streaming_content)
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310  the test S3 server
        return response.read()


def _start(attacker, org, size: int) -> dict:
    created = attacker.post(f"/api/v1/orgs/{org.slug}/datasets/", {"name": "people"}, format="json")
    assert created.status_code == 201, created.content
    started = attacker.post(
        f"/api/v1/orgs/{org.slug}/datasets/people/uploads/",
        {"filename": "people.csv", "size_bytes": size},
        format="json",
    )
    assert started.status_code == 201, started.content
    return started.json()


def _finalize(attacker, org, started: dict):
    return attacker.post(
        f"/api/v1/orgs/{org.slug}/datasets/people/uploads/{started['id']}/finalize/"
    )


def test_a_finalized_upload_cannot_be_overwritten_through_its_upload_url(
    storage, org, attacker, client
):
    started = _start(attacker, org, len(CHECKED))
    upload_key = PendingUpload.objects.get().storage_key
    assert _post_file(client, started, CHECKED) in (200, 204)
    finalized = _finalize(attacker, org, started)
    assert finalized.status_code == 201, finalized.content

    # The declared size, so the store's size bound alone cannot stop it; sent before the
    # background check has read the version.
    poison = b"age,city,score\n99,Nowhere,9.9\n" + b"9" * (len(CHECKED) - 31) + b"\n"
    assert len(poison) == len(CHECKED)
    late = _post_file(client, started, poison)
    check_uploads()
    recorded = attacker.get(f"/api/v1/orgs/{org.slug}/datasets/people/versions/1/").json()
    assert recorded["state"] == "ready"
    recorded = recorded["sha256"]
    assert recorded == hashlib.sha256(CHECKED).hexdigest()

    link = attacker.get(f"/api/v1/orgs/{org.slug}/datasets/people/versions/1/download/").json()
    served = _get(client, link["url"])
    assert served == CHECKED
    assert link["sha256"] == recorded == hashlib.sha256(served).hexdigest()
    version = DatasetVersion.objects.get()
    assert version.storage_key != upload_key
    assert (version.size_bytes, storage.size(version.storage_key)) == (len(CHECKED), len(CHECKED))
    if storage.__class__.__name__ == "LocalStorage":
        # The local URL is refused outright once its upload is finalized.
        assert late == 404
        assert storage.size(upload_key) is None
    else:
        # S3 cannot revoke a presigned POST before it expires: the late write lands on the
        # upload's key, which no row refers to any more (the orphan sweep deletes it).
        assert late == 204
        assert storage.size(upload_key) == len(poison)
        assert not PendingUpload.objects.exists()


def test_an_upload_larger_than_declared_is_refused_by_the_store(storage, org, attacker, client):
    started = _start(attacker, org, len(CHECKED))

    status = _post_file(client, started, CHECKED + POISON)

    assert status in (400, 413), status  # S3: 400 EntityTooLarge; local: 413
    upload = PendingUpload.objects.get()
    assert storage.size(upload.storage_key) is None
    finalized = _finalize(attacker, org, started)
    assert finalized.status_code == 400
    assert "Nothing was uploaded" in finalized.json()["detail"]
    assert not DatasetVersion.objects.exists()


def test_an_upload_smaller_than_declared_is_refused_by_the_store(storage, org, attacker, client):
    started = _start(attacker, org, len(CHECKED))

    status = _post_file(client, started, CHECKED[:-5])

    assert status == 400
    assert storage.size(PendingUpload.objects.get().storage_key) is None


def test_an_expired_upload_url_is_refused_locally(local_storage, org, attacker, client):
    started = _start(attacker, org, len(CHECKED))
    PendingUpload.objects.update(expires_at="2000-01-01T00:00Z")

    assert _post_file(client, started, CHECKED) == 404
    assert local_storage.size(PendingUpload.objects.get().storage_key) is None


def _open_upload(attacker, org, size: int):
    return attacker.post(
        f"/api/v1/orgs/{org.slug}/datasets/people/uploads/",
        {"filename": "people.csv", "size_bytes": size},
        format="json",
    )


def test_open_uploads_cannot_reserve_more_than_the_storage_quota(storage, org, attacker, client):
    """An organization near its quota opens uploads that each fit alone but not together: the
    one that would take the open ones past the quota is refused, and nothing is reserved for it.
    Before the fix each was checked alone, so the open uploads' storage was unbounded."""
    created = attacker.post(f"/api/v1/orgs/{org.slug}/datasets/", {"name": "people"}, format="json")
    assert created.status_code == 201, created.content
    stored = attacker.post(
        f"/api/v1/orgs/{org.slug}/datasets/people/versions/",
        {"file": SimpleUploadedFile("people.csv", CHECKED)},
        format="multipart",
    )
    assert stored.status_code == 201, stored.content
    # An operator's quota that leaves room for exactly two more files of that size.
    StorageAccount.objects.filter(organization=org).update(quota_bytes=3 * len(CHECKED))

    first = _open_upload(attacker, org, len(CHECKED))
    second = _open_upload(attacker, org, len(CHECKED))
    third = _open_upload(attacker, org, len(CHECKED))

    assert (first.status_code, second.status_code) == (201, 201)
    assert (third.status_code, third.json().get("code")) == (400, "storage_quota_exceeded")
    assert "2 open uploads" in third.json()["detail"], third.json()
    assert PendingUpload.objects.count() == 2
    # The reserved bytes are the upload's own: finalizing one does not count it twice.
    assert _post_file(client, first.json(), CHECKED) in (200, 204)
    assert _finalize(attacker, org, first.json()).status_code == 201
    assert StorageAccount.objects.get(organization=org).used_bytes == 2 * len(CHECKED)


@override_settings(STORAGE_MAX_OPEN_UPLOADS=3)
def test_an_organization_cannot_hold_more_open_uploads_than_the_cap(local_storage, org, attacker):
    """Uploads cost nothing until finalized, so their number is capped per organization; once
    one is finalized or expires, another may start. Before the fix only the throttle bounded
    them (30 a minute, 6 hours each)."""
    created = attacker.post(f"/api/v1/orgs/{org.slug}/datasets/", {"name": "people"}, format="json")
    assert created.status_code == 201, created.content

    statuses = [_open_upload(attacker, org, 10).status_code for _ in range(3)]
    refused = _open_upload(attacker, org, 10)

    assert statuses == [201, 201, 201]
    assert (refused.status_code, refused.json().get("code")) == (409, "too_many_open_uploads")
    assert "3 uploads are open" in refused.json()["detail"], refused.json()
    assert PendingUpload.objects.count() == 3
    PendingUpload.objects.filter(pk=PendingUpload.objects.earliest("created_at").pk).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert _open_upload(attacker, org, 10).status_code == 201


@pytest.mark.django_db(transaction=True)
def test_two_finalizes_of_one_upload_copy_it_once(storage, org, member_factory, key_client_for):
    """A client sends finalize twice at once (a retry, or on purpose to make the server copy and
    stream one upload many times over). The first claims the upload; the second gets 409 at once,
    before any copy. Before the fix both copied and streamed it, and one lost at the lock."""
    developer = member_factory(org, "developer")
    first_client, second_client = (key_client_for(developer, org) for _ in range(2))
    started = _start(first_client, org, len(CHECKED))
    assert _post_file(APIClient(), started, CHECKED) in (200, 204)
    copies, copying, finish_copy = [], threading.Event(), threading.Event()
    copy = storage._copy

    def counted_copy(source_key, target_key):
        copies.append(target_key)
        if len(copies) == 1:
            # The first copy is held until the second finalize has had its answer.
            copying.set()
            assert finish_copy.wait(timeout=60)
        copy(source_key, target_key)

    storage._copy = counted_copy
    answers = {}

    def finalize_first():
        try:
            answers["first"] = _finalize(first_client, org, started)
        finally:
            connection.close()

    first = threading.Thread(target=finalize_first)
    first.start()
    try:
        assert copying.wait(timeout=60), "the first finalize never reached its copy"
        second = _finalize(second_client, org, started)
    finally:
        finish_copy.set()
        first.join(timeout=120)
        storage._copy = copy

    assert (second.status_code, second.json().get("code")) == (409, "upload_being_finalized")
    assert len(copies) == 1
    assert answers["first"].status_code == 201, answers["first"].content
    version = DatasetVersion.objects.get()
    assert version.storage_key == copies[0]
    assert storage.size(version.storage_key) == len(CHECKED)
    assert not PendingUpload.objects.exists()
