"""Uploads in parts, attacked through the API as a tenant would, on both storage backends: a
part bigger than reserved, finalize with a part missing, part numbers out of range, another
organization's upload, a second finalize; and an expired or cancelled upload leaves no multipart
upload in storage."""

import hashlib
import socket
import urllib.error
import urllib.request
from datetime import timedelta
from urllib.parse import urlsplit

import pytest
from django.utils import timezone

from jobs.services.storage_sweep import storage_orphans_sweep
from registry.models import DatasetVersion, PendingUpload
from registry.storage import new_object_key
from registry.storage.base import UploadNotFound
from tests.factories import PendingUploadFactory
from tests.registry.conftest import check_uploads

pytestmark = pytest.mark.django_db

BACKENDS = ["local", "s3"]
PART = 5 * 1024 * 1024  # S3's smallest part but the last
HEADER = b"reading,sensor,value\n"


def _csv(size: int) -> bytes:
    rows = b"".join(b"%d,s%d,%d.5\n" % (n, n % 97, n % 13) for n in range(size // 8))
    body = HEADER + rows
    cut = body.rindex(b"\n", 0, size) + 1
    # The last row takes up the rest, its value as long as the size needs.
    return body[:cut] + b"0,s0," + b"1" * (size - cut - 6) + b"\n"


DATA = _csv(PART + 4321)  # two parts: PART bytes, then 4321


@pytest.fixture(params=BACKENDS)
def storage(request):
    return request.getfixturevalue(f"{request.param}_storage")


@pytest.fixture
def attacker(org, member_factory, key_client_for):
    """A developer's API key: allowed to upload, nothing more."""
    client = key_client_for(member_factory(org, "developer"), org)
    created = client.post(f"/api/v1/orgs/{org.slug}/datasets/", {"name": "people"}, format="json")
    assert created.status_code == 201, created.content
    return client


def _uploads(org) -> str:
    return f"/api/v1/orgs/{org.slug}/datasets/people/uploads/"


def _start(client, org, size: int = len(DATA)) -> dict:
    started = client.post(
        _uploads(org),
        {"filename": "people.csv", "size_bytes": size, "parts": True, "part_size_bytes": PART},
        format="json",
    )
    assert started.status_code == 201, started.content
    return started.json()


def _part_urls(client, org, started: dict, numbers) -> dict[int, dict]:
    answer = client.post(
        f"{_uploads(org)}{started['id']}/parts/", {"numbers": numbers}, format="json"
    )
    assert answer.status_code == 200, answer.content
    return {part["number"]: part for part in answer.json()["parts"]}


def _put(client, url: str, body: bytes) -> int:
    """PUT a part as a client does; local URLs through the Django test client, S3 ones over
    HTTP to the real server."""
    parts = urlsplit(url)
    if parts.path.startswith("/storage/local/"):
        return client.generic(
            "PUT", parts.path, body, content_type="application/octet-stream"
        ).status_code
    request = urllib.request.Request(url, data=body, method="PUT")  # noqa: S310  test S3
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _send(api, client, org, started: dict, numbers, data: bytes = DATA) -> None:
    """Ask the API (`api`) for the parts' URLs and PUT them there as anyone (`client`)."""
    for number, part in _part_urls(api, org, started, numbers).items():
        start = (number - 1) * PART
        assert _put(client, part["url"], data[start : start + part["size_bytes"]]) == 200


def _finalize(client, org, started: dict):
    return client.post(f"{_uploads(org)}{started['id']}/finalize/")


def _open_multipart(storage, org) -> list:
    return list(storage.multipart_uploads(f"orgs/{org.pk}/"))


def test_an_upload_in_parts_becomes_the_checked_version(storage, org, attacker, client):
    started = _start(attacker, org)
    assert (started["url"], started["part_count"], started["part_size_bytes"]) == (None, 2, PART)

    _send(attacker, client, org, started, [2, 1])
    held = attacker.get(f"{_uploads(org)}{started['id']}/parts/").json()
    finalized = _finalize(attacker, org, started)

    assert held["missing"] == []
    assert [(p["number"], p["size_bytes"]) for p in held["parts"]] == [(1, PART), (2, 4321)]
    assert finalized.status_code == 201, finalized.content
    [checked] = check_uploads()
    assert (checked.state, checked.size_bytes) == ("ready", len(DATA)), checked.rejection_reason
    assert checked.sha256 == hashlib.sha256(DATA).hexdigest()
    assert not PendingUpload.objects.exists()
    assert _open_multipart(storage, org) == []


def test_finalize_with_a_part_missing_is_refused_and_records_nothing(
    storage, org, attacker, client
):
    started = _start(attacker, org)
    _send(attacker, client, org, started, [1])

    refused = _finalize(attacker, org, started)

    assert (refused.status_code, refused.json()["code"]) == (400, "upload_incomplete")
    assert "send part 2" in refused.json()["detail"]
    assert not DatasetVersion.objects.exists()
    assert storage.size(PendingUpload.objects.get().storage_key) is None
    held = attacker.get(f"{_uploads(org)}{started['id']}/parts/").json()
    assert held["missing"] == [2]
    # The refusal kept the upload: sending the missing part completes it.
    _send(attacker, client, org, started, [2])
    assert _finalize(attacker, org, started).status_code == 201
    assert [v.state for v in check_uploads()] == ["ready"]


def test_a_part_bigger_than_reserved_is_refused_by_the_store(storage, org, attacker, client):
    started = _start(attacker, org)
    last = _part_urls(attacker, org, started, [2])[2]

    status = _put(client, last["url"], DATA[PART:] + b"9,s9,9.5\n" * 1000)

    # S3: the length is a signed header, so another one no longer matches (403); local: 400.
    assert status in (400, 403), status
    held = attacker.get(f"{_uploads(org)}{started['id']}/parts/").json()
    assert (held["parts"], held["missing"]) == ([], [1, 2])


def test_another_organizations_upload_is_not_found(
    storage, org, other_org, attacker, member_factory, key_client_for
):
    started = _start(attacker, org)
    outsider = key_client_for(member_factory(other_org, "owner"), other_org)
    # The outsider names the victim's upload id under its own organization, and a dataset of
    # the same name there.
    outsider.post(f"/api/v1/orgs/{other_org.slug}/datasets/", {"name": "people"}, format="json")
    theirs = f"/api/v1/orgs/{other_org.slug}/datasets/people/uploads/{started['id']}/"

    answers = [
        outsider.get(f"{theirs}parts/").status_code,
        outsider.post(f"{theirs}parts/", {"numbers": [1]}, format="json").status_code,
        outsider.post(f"{theirs}finalize/").status_code,
        outsider.delete(theirs).status_code,
    ]

    assert answers == [404, 404, 404, 404]
    assert PendingUpload.objects.filter(pk=started["id"]).exists()


@pytest.mark.parametrize(
    "numbers", [[0], [-1], [3], [10**12], [1, 2**63], ["one"], [], [1.5], "1", None]
)
def test_part_numbers_outside_the_upload_are_refused(local_storage, org, attacker, numbers):
    started = _start(attacker, org)

    answer = attacker.post(
        f"{_uploads(org)}{started['id']}/parts/", {"numbers": numbers}, format="json"
    )

    assert answer.status_code == 400, answer.content
    assert "url" not in answer.content.decode()


def test_too_many_part_numbers_at_once_are_refused(local_storage, org, attacker):
    started = _start(attacker, org)

    answer = attacker.post(
        f"{_uploads(org)}{started['id']}/parts/", {"numbers": [1] * 1001}, format="json"
    )

    assert answer.status_code == 400


def test_a_part_size_outside_the_bounds_is_refused(local_storage, org, attacker):
    for size in (0, 1024, 6 * 1024**3):
        answer = attacker.post(
            _uploads(org),
            {"filename": "a.csv", "size_bytes": len(DATA), "parts": True, "part_size_bytes": size},
            format="json",
        )
        assert answer.status_code == 400, (size, answer.content)
    assert not PendingUpload.objects.exists()


def test_a_single_post_upload_has_no_parts(local_storage, org, attacker):
    started = attacker.post(
        _uploads(org), {"filename": "a.csv", "size_bytes": 10}, format="json"
    ).json()
    assert started["part_count"] == 0 and started["url"]

    answer = attacker.post(
        f"{_uploads(org)}{started['id']}/parts/", {"numbers": [1]}, format="json"
    )

    assert (answer.status_code, answer.json()["code"]) == (400, "upload_not_in_parts")


def test_a_completed_upload_cannot_be_completed_twice(storage, org, attacker, client):
    started = _start(attacker, org)
    urls = _part_urls(attacker, org, started, [1, 2])
    assert _put(client, urls[1]["url"], DATA[:PART]) == 200
    assert _put(client, urls[2]["url"], DATA[PART:]) == 200
    assert _finalize(attacker, org, started).status_code == 201

    again = _finalize(attacker, org, started)
    late = _put(client, urls[2]["url"], DATA[PART:])

    assert again.status_code == 404
    assert DatasetVersion.objects.count() == 1
    # The part URL no longer writes: the completed upload takes no more parts.
    assert late == 404


def test_an_expired_upload_is_aborted_in_storage(storage, org, attacker, client):
    started = _start(attacker, org)
    part = _part_urls(attacker, org, started, [1])[1]
    assert _put(client, part["url"], DATA[:PART]) == 200
    upload = PendingUpload.objects.get()
    assert _open_multipart(storage, org) != []
    PendingUpload.objects.update(expires_at=timezone.now() - timedelta(hours=1))

    storage_orphans_sweep(older_than=timedelta(0))

    assert not PendingUpload.objects.exists()
    assert _open_multipart(storage, org) == []
    with pytest.raises(UploadNotFound):
        storage.multipart_parts(upload.storage_key, upload_id=upload.multipart_upload_id)
    assert _put(client, part["url"], DATA[:PART]) == 404


def test_a_cancelled_upload_is_aborted_in_storage(
    storage, org, attacker, client, django_capture_on_commit_callbacks
):
    started = _start(attacker, org)
    _send(attacker, client, org, started, [1])

    with django_capture_on_commit_callbacks(execute=True):
        cancelled = attacker.delete(f"{_uploads(org)}{started['id']}/")

    assert cancelled.status_code == 204
    assert not PendingUpload.objects.exists()
    assert _open_multipart(storage, org) == []
    assert _finalize(attacker, org, started).status_code == 404


def test_a_multipart_upload_no_row_holds_is_aborted_by_the_sweep(storage, org):
    """A start that died between opening the store's upload and recording its id."""
    key = new_object_key(organization_id=org.pk, kind="datasets", filename="lost.csv")
    storage.multipart_start(key)
    held_key = new_object_key(organization_id=org.pk, kind="datasets", filename="held.csv")
    held = PendingUploadFactory(
        organization=org,
        storage_key=held_key,
        part_size_bytes=PART,
        multipart_upload_id=storage.multipart_start(held_key),
    )

    storage_orphans_sweep(older_than=timedelta(0), now=timezone.now() + timedelta(seconds=1))

    assert [upload_id for _k, upload_id, _s in _open_multipart(storage, org)] == [
        held.multipart_upload_id
    ]


def test_a_finalize_that_died_after_completing_is_recorded_by_the_next(
    storage, org, attacker, client
):
    """The store completed the upload but the finalize died before recording it: sent again,
    finalize finds no open upload, the whole object under the upload's key, and records it."""
    started = _start(attacker, org)
    _send(attacker, client, org, started, [1, 2])
    upload = PendingUpload.objects.get()
    held = storage.multipart_parts(upload.storage_key, upload_id=upload.multipart_upload_id)
    storage.multipart_complete(upload.storage_key, upload_id=upload.multipart_upload_id, parts=held)

    finalized = _finalize(attacker, org, started)

    assert finalized.status_code == 201, finalized.content
    assert DatasetVersion.objects.get().storage_key == upload.storage_key
    assert [v.state for v in check_uploads()] == ["ready"]


def test_a_store_that_does_not_answer_gets_503_and_the_upload_is_not_kept(
    s3_storage, settings, org, attacker
):
    """An outage of S3 when an upload in parts starts is a 503 saying when to come back, never
    a 500, and leaves no reservation holding the organization's quota or upload places."""
    with socket.socket() as closed:  # a port nothing listens on: the store is down
        closed.bind(("127.0.0.1", 0))
        settings.S3_ENDPOINT_URL = f"http://127.0.0.1:{closed.getsockname()[1]}"

    answer = attacker.post(
        _uploads(org),
        {"filename": "people.csv", "size_bytes": len(DATA), "parts": True},
        format="json",
    )

    assert answer.status_code == 503, answer.content
    assert answer.json()["code"] == "storage_unavailable"
    assert int(answer["Retry-After"]) > 0
    assert not PendingUpload.objects.filter(dataset__organization=org).exists()
