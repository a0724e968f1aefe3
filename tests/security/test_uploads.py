"""Exploits against presigned uploads, sent through the API as a tenant would, on both storage
backends: overwrite a finalized version's bytes through its old upload URL, and send more bytes
than were declared. Before the fix the first replaced the version's bytes (unbilled, unchecked,
no longer matching the sha256 shown) and the second was stored."""

import hashlib
import urllib.request
from urllib.parse import urlsplit

import pytest

from registry.models import DatasetVersion, PendingUpload
from tests.registry.conftest import post_presigned

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
    recorded = finalized.json()["sha256"]
    assert recorded == hashlib.sha256(CHECKED).hexdigest()

    # The declared size, so the store's size bound alone cannot stop it.
    poison = b"age,city,score\n99,Nowhere,9.9\n" + b"9" * (len(CHECKED) - 31) + b"\n"
    assert len(poison) == len(CHECKED)
    late = _post_file(client, started, poison)

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
