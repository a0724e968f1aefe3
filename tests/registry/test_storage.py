"""Artifact storage: both backends behave alike, keys stay inside the tenant's prefix, S3 runs
against a real SeaweedFS with enforced credentials, and local signed URLs are the only way in."""

import hashlib
import io
import os
import re
import secrets
import time
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path
from unittest import mock
from urllib.parse import urlsplit

import pytest
from botocore.exceptions import ClientError
from django.core import signing
from django.http import HttpResponse
from django.test import override_settings
from django.utils import timezone

from registry.storage import (
    ObjectMismatch,
    ObjectNotFound,
    ObjectTooLarge,
    StorageError,
    StoredObject,
    get_storage,
    new_object_key,
    organization_prefix,
)
from registry.storage.keys import check_key
from registry.storage.local import DOWNLOAD_SALT, TEMP_PREFIX, UPLOAD_SALT
from registry.storage.s3 import PART_SIZE, S3Storage
from tests.factories import PendingUploadFactory
from tests.registry.conftest import multipart_form, post_presigned

BACKENDS = ["local", "s3"]
# Local presigned URLs reverse the signed-URL views, which this URLconf mounts as the project does.
pytestmark = pytest.mark.urls("tests.registry.storage_urls")

KEY_SHAPE = re.compile(r"orgs/(\d+)/(\w+)/[0-9a-f]{32}/([A-Za-z0-9._-]{1,100})")


@pytest.fixture(params=BACKENDS)
def storage(request):
    return request.getfixturevalue(f"{request.param}_storage")


@pytest.fixture
def org_id():
    """A fresh organization id, so tests sharing the session's bucket never see each other."""
    return secrets.randbelow(2**31) + 1


class GeneratedStream:
    """`size` bytes made as they are read, never held whole; each 64 KiB block carries its index,
    so a lost, repeated or reordered part changes the digest. Reads return at most `max_read`
    bytes, as a socket does."""

    _BLOCK = os.urandom(64 * 1024 - 8)

    def __init__(self, size: int, *, max_read: int = 256 * 1024, fail_after: int | None = None):
        self.size = size
        self.sha256 = hashlib.sha256()
        self._sent = 0
        self._buffer = b""
        self._index = 0
        self._max_read = max_read
        self._fail_after = fail_after

    def read(self, n: int = -1) -> bytes:
        if self._fail_after is not None and self._sent >= self._fail_after:
            raise OSError("client went away")
        left = self.size - self._sent
        want = min(left, self._max_read) if n < 0 else min(n, left, self._max_read)
        blocks = [self._buffer]
        have = len(self._buffer)
        while have < want:
            block = self._index.to_bytes(8, "big") + self._BLOCK
            self._index += 1
            blocks.append(block)
            have += len(block)
        data = b"".join(blocks)
        chunk, self._buffer = data[:want], data[want:]
        self._sent += len(chunk)
        self.sha256.update(chunk)
        return chunk


def _sha256_of(storage, key: str) -> str:
    digest = hashlib.sha256()
    with storage.open(key) as reader:
        while chunk := reader.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _files_under(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file()]


# Shared behaviour, on both backends.


def test_save_returns_size_and_sha256_and_reads_back(storage, org_id):
    data = os.urandom(100_000)
    key = new_object_key(organization_id=org_id, kind="datasets", filename="train.csv")

    stored = storage.save(key, io.BytesIO(data), content_type="text/csv")

    assert stored == StoredObject(key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    assert storage.size(key) == len(data)
    with storage.open(key) as reader:
        assert reader.read() == data


def test_empty_object_round_trips(storage, org_id):
    key = new_object_key(organization_id=org_id, kind="uploads")

    stored = storage.save(key, io.BytesIO(b""))

    assert (stored.size, stored.sha256) == (0, hashlib.sha256(b"").hexdigest())
    assert storage.size(key) == 0


def test_save_replaces_an_existing_object(storage, org_id):
    key = new_object_key(organization_id=org_id, kind="models")
    storage.save(key, io.BytesIO(b"first version"))

    storage.save(key, io.BytesIO(b"second"))

    with storage.open(key) as reader:
        assert reader.read() == b"second"


def test_limit_is_inclusive_and_one_byte_over_keeps_nothing(storage, org_id):
    key = new_object_key(organization_id=org_id, kind="uploads")
    assert storage.save(key, io.BytesIO(b"x" * 1000), max_bytes=1000).size == 1000
    other = new_object_key(organization_id=org_id, kind="uploads")

    with pytest.raises(ObjectTooLarge):
        storage.save(other, io.BytesIO(b"x" * 1001), max_bytes=1000)

    assert storage.size(other) is None


def test_missing_object_has_no_size_and_cannot_be_opened(storage, org_id):
    key = new_object_key(organization_id=org_id, kind="datasets")

    assert storage.size(key) is None
    with pytest.raises(ObjectNotFound), storage.open(key):
        pass


def test_delete_removes_one_object_and_tolerates_missing(storage, org_id):
    key = new_object_key(organization_id=org_id, kind="checkpoints")
    storage.save(key, io.BytesIO(b"weights"))

    storage.delete(key)
    storage.delete(key)

    assert storage.size(key) is None


def test_delete_prefix_removes_only_objects_under_it(storage, org_id):
    def put(organization_id, kind):
        key = new_object_key(organization_id=organization_id, kind=kind)
        storage.save(key, io.BytesIO(b"payload"))
        return key

    datasets = [put(org_id, "datasets") for _ in range(3)]
    model = put(org_id, "models")
    neighbour = put(org_id + 1, "datasets")

    assert storage.delete_prefix(f"{organization_prefix(org_id)}datasets/") == 3
    assert storage.delete_prefix(organization_prefix(org_id)) == 1
    assert storage.delete_prefix(organization_prefix(org_id)) == 0

    assert [storage.size(key) for key in [*datasets, model]] == [None] * 4
    assert storage.size(neighbour) == len(b"payload")


def test_copy_makes_an_object_that_later_writes_to_the_source_leave_alone(storage, org_id):
    source = new_object_key(organization_id=org_id, kind="uploads")
    target = new_object_key(organization_id=org_id, kind="datasets")
    data = os.urandom(50_000)
    storage.save(source, io.BytesIO(data))

    storage.copy(source, target)
    storage.save(source, io.BytesIO(b"replaced"))
    storage.delete(source)

    assert _sha256_of(storage, target) == hashlib.sha256(data).hexdigest()


def test_s3_copy_of_a_large_object_goes_part_by_part_and_reads_back(s3_storage, org_id):
    source = new_object_key(organization_id=org_id, kind="uploads")
    target = new_object_key(organization_id=org_id, kind="datasets")
    stream = GeneratedStream(PART_SIZE + 1024 * 1024 + 17)
    s3_storage.save(source, stream)

    s3_storage.copy(source, target)

    assert s3_storage.size(target) == stream.size
    assert _sha256_of(s3_storage, target) == stream.sha256.hexdigest()


def test_copy_of_a_missing_object_is_object_not_found(storage, org_id):
    with pytest.raises(ObjectNotFound):
        storage.copy(
            new_object_key(organization_id=org_id, kind="uploads"),
            new_object_key(organization_id=org_id, kind="datasets"),
        )


def test_download_verified_writes_the_recorded_bytes(storage, org_id, tmp_path):
    key = new_object_key(organization_id=org_id, kind="datasets")
    data = os.urandom(3 * 1024 * 1024 + 5)
    stored = storage.save(key, io.BytesIO(data))

    storage.download_verified(key, tmp_path / "in", size=stored.size, sha256=stored.sha256)

    assert (tmp_path / "in").read_bytes() == data


@pytest.mark.parametrize(
    ("stored", "field", "found"),
    [
        (b"b" * 1000, "sha256", hashlib.sha256(b"b" * 1000).hexdigest()),
        (b"a" * 999, "size", 999),
        (b"a" * (3 * 1024 * 1024), "size", "more than 1000"),
    ],
    ids=["same-size-other-bytes", "shorter", "longer"],
)
def test_download_verified_refuses_other_bytes_and_leaves_no_file(
    storage, org_id, tmp_path, stored, field, found
):
    key = new_object_key(organization_id=org_id, kind="datasets")
    storage.save(key, io.BytesIO(stored))
    recorded = {"size": 1000, "sha256": hashlib.sha256(b"a" * 1000).hexdigest()}

    with pytest.raises(ObjectMismatch) as refused:
        storage.download_verified(key, tmp_path / "in", **recorded)

    assert (refused.value.key, refused.value.field) == (key, field)
    assert (refused.value.recorded, refused.value.found) == (recorded[field], found)
    assert not (tmp_path / "in").exists()


BAD_KEYS = [
    "",
    "data.csv",
    "orgs/",
    "orgs/1",
    "orgs/1/",
    "orgs//datasets/x",
    "orgs/x/datasets/x",
    "orgs/0/datasets/x",
    "orgs/01/datasets/x",
    "orgs/-1/datasets/x",
    "/orgs/1/datasets/x",
    "orgs/1/../2/datasets/x",
    "orgs/1/datasets/..",
    "orgs/1/datasets/a..b",
    "orgs/1/./x",
    "orgs/1/datasets//x",
    "orgs/1/datasets/x/",
    "orgs/1/datasets\\x",
    "orgs/1/datasets/x\x00",
    "orgs/1/datasets/.hidden",
    "orgs/1/datasets/caf\u00e9",
    "other/1/datasets/x",
    "../orgs/1/x",
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_every_method_refuses_keys_outside_an_organization(storage, key):
    calls = [
        lambda: storage.save(key, io.BytesIO(b"x")),
        lambda: storage.open(key),
        lambda: storage.size(key),
        lambda: storage.delete(key),
        lambda: storage.presigned_get_url(key, filename="x"),
        lambda: storage.presigned_post(key, size_bytes=1),
        lambda: storage.copy(key, new_object_key(organization_id=1, kind="datasets")),
        lambda: storage.copy(new_object_key(organization_id=1, kind="uploads"), key),
        lambda: storage.download_verified(key, Path(os.devnull), size=0, sha256=""),
    ]
    for call in calls:
        with pytest.raises(ValueError):
            call()


@pytest.mark.parametrize(
    "prefix", ["", "orgs/", "orgs/1", "/orgs/1/", "orgs/1/../", "orgs/x/", "orgs/1//", "o"]
)
def test_delete_prefix_refuses_prefixes_outside_an_organization(storage, prefix):
    with pytest.raises(ValueError):
        storage.delete_prefix(prefix)


@pytest.mark.parametrize("expires_s", [0, -1, 8 * 24 * 3600])
def test_presigned_urls_refuse_expiry_out_of_range(storage, org_id, expires_s):
    key = new_object_key(organization_id=org_id, kind="datasets")
    with pytest.raises(ValueError):
        storage.presigned_get_url(key, filename="x", expires_s=expires_s)
    with pytest.raises(ValueError):
        storage.presigned_post(key, size_bytes=1, expires_s=expires_s)


# Keys from user file names.

HOSTILE_FILENAMES = {
    "../../etc/passwd": "passwd",
    "/abs": "abs",
    "a/../../b": "b",
    "..": "data",
    ".": "data",
    "....": "data",
    "": "data",
    "dir/": "data",
    "NUL\x00": "NUL_",
    "evil\x00.csv\n": "evil_.csv_",
    "C:\\Users\\me\\..\\evil.exe": "evil.exe",
    "..\\..\\windows\\win.ini": "win.ini",
    "données été.csv": "donnees_ete.csv",
    "数据.csv": "_.csv",
    ".bashrc": "bashrc",
    "-rf": "rf",
    "x..y": "x.y",
    "%2e%2e%2fetc": "_2e_2e_2fetc",
    "a" * 500 + ".csv": "a" * 96 + ".csv",
    "b" * 500: "b" * 100,
}


@pytest.mark.parametrize(("filename", "basename"), HOSTILE_FILENAMES.items())
def test_user_file_names_only_ever_become_a_safe_basename(filename, basename):
    key = new_object_key(organization_id=7, kind="datasets", filename=filename)

    match = KEY_SHAPE.fullmatch(key)
    assert match is not None, key
    assert match.groups() == ("7", "datasets", basename)
    assert check_key(key) == key


def test_hostile_file_name_is_written_inside_the_storage_root(local_storage):
    key = new_object_key(organization_id=3, kind="uploads", filename="../../../../tmp/evil")

    local_storage.save(key, io.BytesIO(b"x"))

    root = local_storage.root
    assert _files_under(root) == [root / "orgs" / "3" / "uploads" / key.split("/")[3] / "evil"]


@pytest.mark.parametrize("kind", ["dataset", "", "../models", "orgs", "models/x"])
def test_new_object_key_refuses_unknown_kinds(kind):
    with pytest.raises(ValueError):
        new_object_key(organization_id=1, kind=kind)


@pytest.mark.parametrize("organization_id", [0, -1, "1", True, 1.0, None])
def test_organization_ids_must_be_positive_ints(organization_id):
    with pytest.raises(ValueError):
        organization_prefix(organization_id)
    with pytest.raises(ValueError):
        new_object_key(organization_id=organization_id, kind="datasets")


def test_organization_prefix_is_the_root_of_its_keys():
    assert organization_prefix(42) == "orgs/42/"
    assert new_object_key(organization_id=42, kind="models").startswith("orgs/42/models/")


# Local backend specifics.


def test_local_errors_leave_no_file_and_no_temporary_file(local_storage, org_id):
    key = new_object_key(organization_id=org_id, kind="uploads")

    with pytest.raises(ObjectTooLarge):
        local_storage.save(key, GeneratedStream(3 * 1024 * 1024), max_bytes=2 * 1024 * 1024)
    with pytest.raises(OSError, match="client went away"):
        local_storage.save(key, GeneratedStream(3 * 1024 * 1024, fail_after=1024 * 1024))

    assert _files_under(local_storage.root) == []


def test_local_save_writes_through_a_temporary_file_in_the_same_directory(local_storage, org_id):
    key = new_object_key(organization_id=org_id, kind="uploads")
    seen = []

    class Watching(io.BytesIO):
        def read(self, n=-1):
            seen.extend(p.name for p in local_storage.path_for(key).parent.iterdir())
            return super().read(n)

    local_storage.save(key, Watching(b"abc"))

    assert seen and all(name.startswith(TEMP_PREFIX) for name in seen)
    assert [p.name for p in local_storage.path_for(key).parent.iterdir()] == [key.split("/")[-1]]


def test_get_storage_is_cached_and_rebuilt_when_settings_change(tmp_path):
    with override_settings(STORAGE_BACKEND="local", STORAGE_LOCAL_ROOT=str(tmp_path / "a")):
        first = get_storage()
        assert get_storage() is first
        with override_settings(STORAGE_LOCAL_ROOT=str(tmp_path / "b")):
            assert get_storage().root == (tmp_path / "b").resolve()
        assert get_storage().root == (tmp_path / "a").resolve()


def test_unknown_backend_is_a_configuration_error():
    from django.core.exceptions import ImproperlyConfigured

    with override_settings(STORAGE_BACKEND="ftp"), pytest.raises(ImproperlyConfigured):
        get_storage()


# Local signed URLs, through the Django views.


def _path(url: str) -> str:
    return urlsplit(url).path


def test_local_signed_download_serves_the_object_as_an_attachment(client, local_storage, org_id):
    key = new_object_key(organization_id=org_id, kind="datasets")
    local_storage.save(key, io.BytesIO(b"a,b\n1,2\n"))

    response = client.get(_path(local_storage.presigned_get_url(key, filename="rapport été.csv")))

    assert response.status_code == 200
    assert b"".join(response.streaming_content) == b"a,b\n1,2\n"
    assert response["Content-Disposition"] == (
        "attachment; filename*=utf-8''rapport%20%C3%A9t%C3%A9.csv"
    )
    assert response["Content-Type"] == "application/octet-stream"


@pytest.fixture
def pending_key(db):
    """The key of a pending upload of `size` bytes: the only keys the local upload view serves."""

    def make(size: int, **kwargs) -> str:
        return PendingUploadFactory(size_bytes=size, **kwargs).storage_key

    return make


def _post(client, url: str, body: bytes, *, fields: dict[str, str] | None = None) -> HttpResponse:
    form, content_type = multipart_form(fields or {}, body)
    return client.generic("POST", _path(url), form, content_type=content_type)


def test_local_signed_upload_stores_the_form_file(client, local_storage, pending_key):
    body = os.urandom(300_000)
    key = pending_key(len(body))

    response = _post(client, local_storage.presigned_post(key, size_bytes=len(body)).url, body)

    assert response.status_code == 204
    assert local_storage.size(key) == len(body)
    assert _sha256_of(local_storage, key) == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("size", [3 * 1024 * 1024, 11], ids=["large", "small"])
def test_local_signed_upload_over_its_size_is_413_and_keeps_nothing(
    client, local_storage, pending_key, size
):
    key = pending_key(size - 1)
    url = local_storage.presigned_post(key, size_bytes=size - 1).url

    response = _post(client, url, b"x" * size)

    assert response.status_code == 413
    assert response.json()["code"] == "object_too_large"
    assert _files_under(local_storage.root) == []


def test_local_signed_upload_refuses_a_body_declared_far_over_its_size(
    client, local_storage, pending_key
):
    key = pending_key(10)
    url = local_storage.presigned_post(key, size_bytes=10).url

    response = client.generic(
        "POST",
        _path(url),
        b"x" * 100,
        content_type="application/octet-stream",
        CONTENT_LENGTH=str(10 * 1024 * 1024),
    )

    assert response.status_code == 413


def test_local_signed_upload_under_its_size_is_400_and_keeps_nothing(
    client, local_storage, pending_key
):
    key = pending_key(10)

    response = _post(client, local_storage.presigned_post(key, size_bytes=10).url, b"x" * 9)

    assert response.status_code == 400
    assert response.json()["code"] == "invalid_upload"
    assert _files_under(local_storage.root) == []


def test_local_signed_upload_without_a_form_file_is_400(client, local_storage, pending_key):
    key = pending_key(3)
    url = local_storage.presigned_post(key, size_bytes=3).url

    raw = client.generic("POST", _path(url), b"abc", content_type="application/octet-stream")

    assert raw.status_code == 400
    assert local_storage.size(key) is None


def test_local_signed_upload_needs_an_open_pending_upload(client, local_storage, pending_key, db):
    expired = pending_key(3, expires_at=timezone.now() - timedelta(seconds=1))
    finalized = new_object_key(organization_id=1, kind="uploads")  # no row: finalized or never

    for key in (expired, finalized):
        url = local_storage.presigned_post(key, size_bytes=3).url
        assert _post(client, url, b"abc").status_code == 404
        assert local_storage.size(key) is None


def _tamper(url: str) -> str:
    path = _path(url)
    token = path.split("/")[-2]
    position = len(token) // 2
    swapped = "A" if token[position] != "A" else "B"
    return path.replace(token, token[:position] + swapped + token[position + 1 :])


def test_local_tampered_tokens_are_404(client, local_storage, pending_key):
    key = pending_key(9)
    local_storage.save(key, io.BytesIO(b"secret"))

    download = client.get(_tamper(local_storage.presigned_get_url(key, filename="x")))
    upload = _post(
        client, _tamper(local_storage.presigned_post(key, size_bytes=9).url), b"overwrite"
    )

    assert (download.status_code, upload.status_code) == (404, 404)
    with local_storage.open(key) as reader:
        assert reader.read() == b"secret"


def test_local_expired_tokens_are_404(client, local_storage, pending_key):
    key = pending_key(3)
    local_storage.save(key, io.BytesIO(b"old"))
    with mock.patch("time.time", return_value=time.time() - 301):
        download_url = local_storage.presigned_get_url(key, filename="x", expires_s=300)
        upload_url = local_storage.presigned_post(key, size_bytes=3, expires_s=300).url

    assert client.get(_path(download_url)).status_code == 404
    assert _post(client, upload_url, b"new").status_code == 404


def test_local_token_for_one_purpose_does_not_open_the_other(client, local_storage, pending_key):
    key = pending_key(3)
    local_storage.save(key, io.BytesIO(b"data"))
    download_token = _path(local_storage.presigned_get_url(key, filename="x")).split("/")[-2]
    upload_token = _path(local_storage.presigned_post(key, size_bytes=3).url).split("/")[-2]

    assert _post(client, f"/storage/local/{download_token}/upload", b"new").status_code == 404
    assert client.get(f"/storage/local/{upload_token}/download").status_code == 404


@pytest.mark.parametrize("key", ["orgs/1/../../etc/passwd", "/etc/passwd", "orgs/1/a\\b"])
def test_local_signed_key_outside_an_organization_is_404(client, local_storage, key):
    """Even a correctly signed token (a leaked SECRET_KEY) cannot name a path outside orgs/."""
    download = signing.TimestampSigner(salt=DOWNLOAD_SALT).sign_object({"k": key, "e": 60})
    upload = signing.TimestampSigner(salt=UPLOAD_SALT).sign_object({"k": key, "e": 60, "n": 1})

    assert client.get(f"/storage/local/{download}/download").status_code == 404
    assert _post(client, f"/storage/local/{upload}/upload", b"x").status_code == 404


def test_local_views_refuse_methods_they_do_not_serve(client, local_storage, pending_key):
    key = pending_key(4)
    local_storage.save(key, io.BytesIO(b"data"))
    upload_url = _path(local_storage.presigned_post(key, size_bytes=4).url)

    assert client.post(_path(local_storage.presigned_get_url(key, filename="x"))).status_code == 405
    assert client.get(upload_url).status_code == 405
    # The old presigned PUT: its bound-less body is no longer accepted anywhere.
    assert client.put(upload_url, b"evil").status_code == 405


# S3 backend specifics, against the real server.


def test_s3_large_object_is_a_multipart_upload_that_reads_back(s3_storage, s3_server, org_id):
    key = new_object_key(organization_id=org_id, kind="checkpoints")
    stream = GeneratedStream(PART_SIZE + 1024 * 1024 + 17, max_read=64 * 1024)

    stored = s3_storage.save(key, stream)

    assert stored == StoredObject(key=key, size=stream.size, sha256=stream.sha256.hexdigest())
    head = s3_server.client().head_object(Bucket=s3_server.bucket, Key=key)
    assert head["ContentLength"] == stream.size
    assert head["ETag"].strip('"').endswith("-2")
    assert _sha256_of(s3_storage, key) == stored.sha256


def _open_uploads(s3_server, key: str) -> list:
    return (
        s3_server.client()
        .list_multipart_uploads(Bucket=s3_server.bucket, Prefix=key)
        .get("Uploads", [])
    )


def test_s3_multipart_over_the_limit_is_aborted(s3_storage, s3_server, org_id):
    key = new_object_key(organization_id=org_id, kind="uploads")

    with pytest.raises(ObjectTooLarge):
        s3_storage.save(key, GeneratedStream(3 * PART_SIZE), max_bytes=2 * PART_SIZE - 1)

    assert s3_storage.size(key) is None
    assert _open_uploads(s3_server, key) == []


def test_s3_stream_failure_mid_upload_is_aborted(s3_storage, s3_server, org_id):
    key = new_object_key(organization_id=org_id, kind="uploads")

    with pytest.raises(OSError, match="client went away"):
        s3_storage.save(key, GeneratedStream(3 * PART_SIZE, fail_after=PART_SIZE + 1))

    assert s3_storage.size(key) is None
    assert _open_uploads(s3_server, key) == []


def test_s3_presigned_get_downloads_over_http_with_the_file_name(s3_storage, org_id):
    key = new_object_key(organization_id=org_id, kind="predictions")
    s3_storage.save(key, io.BytesIO(b"id,score\n1,0.9\n"), content_type="text/csv")

    url = s3_storage.presigned_get_url(key, filename='../scores "final".csv')
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (our own http URL)
        body = response.read()
        disposition = response.headers["Content-Disposition"]
        content_type = response.headers["Content-Type"]

    assert (body, content_type) == (b"id,score\n1,0.9\n", "text/csv")
    assert disposition == 'attachment; filename="scores \\"final\\".csv"'


def test_s3_presigned_post_stores_exactly_the_declared_size_over_http(s3_storage, org_id):
    key = new_object_key(organization_id=org_id, kind="uploads")
    body = os.urandom(200_000)
    form = s3_storage.presigned_post(key, size_bytes=len(body))

    assert post_presigned(None, form.url, form.fields, body + b"x") == 400
    assert post_presigned(None, form.url, form.fields, body[:-1]) == 400
    assert s3_storage.size(key) is None
    assert post_presigned(None, form.url, form.fields, body) == 204

    assert s3_storage.size(key) == len(body)
    assert _sha256_of(s3_storage, key) == hashlib.sha256(body).hexdigest()


def test_s3_presigned_post_writes_only_its_own_key(s3_storage, org_id):
    key = new_object_key(organization_id=org_id, kind="uploads")
    elsewhere = new_object_key(organization_id=org_id, kind="datasets")
    form = s3_storage.presigned_post(key, size_bytes=4)

    status = post_presigned(None, form.url, {**form.fields, "key": elsewhere}, b"evil")

    assert status == 403
    assert s3_storage.size(elsewhere) is None


def test_s3_server_refuses_wrong_credentials(s3_storage, s3_server, org_id):
    key = new_object_key(organization_id=org_id, kind="datasets")
    s3_storage.save(key, io.BytesIO(b"private"))
    anonymous_url = f"{s3_server.endpoint_url}/{s3_server.bucket}/{key}"

    with pytest.raises(ClientError) as wrong_secret:
        s3_server.client(secret_key="not-the-secret").head_object(Bucket=s3_server.bucket, Key=key)
    with pytest.raises(ClientError) as unknown_key:
        s3_server.client(access_key="AKUNKNOWN").get_object(Bucket=s3_server.bucket, Key=key)
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(anonymous_url, timeout=10)  # noqa: S310 (our own http URL)
    intruder = S3Storage(
        endpoint_url=s3_server.endpoint_url,
        bucket=s3_server.bucket,
        region=s3_server.region,
        access_key_id=s3_server.access_key,
        secret_access_key="not-the-secret",
    )
    with pytest.raises(StorageError):
        intruder.save(new_object_key(organization_id=org_id, kind="datasets"), io.BytesIO(b"x"))

    assert wrong_secret.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert unknown_key.value.response["Error"]["Code"] == "InvalidAccessKeyId"
    assert anonymous.value.code == 403
    with s3_storage.open(key) as reader:
        assert reader.read() == b"private"


def test_s3_ensure_bucket_creates_a_missing_bucket_once(s3_server):
    """Only the first call creates the bucket; later calls, and another process's storage, find it
    and send no CreateBucket at all (counted as requests the server answered)."""
    bucket = f"ensure-{secrets.token_hex(6)}"

    def storage_counting(created: list[int]) -> S3Storage:
        storage = S3Storage(
            endpoint_url=s3_server.endpoint_url,
            bucket=bucket,
            region=s3_server.region,
            access_key_id=s3_server.access_key,
            secret_access_key=s3_server.secret_key,
        )
        storage._client.meta.events.register(
            "after-call.s3.CreateBucket",
            lambda http_response, **kwargs: created.append(http_response.status_code),
        )
        return storage

    first_process, second_process = [], []
    first = storage_counting(first_process)
    with pytest.raises(ClientError):
        s3_server.client().head_bucket(Bucket=bucket)

    first.ensure_bucket()
    first.ensure_bucket()
    storage_counting(second_process).ensure_bucket()

    assert first_process == [200]
    assert second_process == []
    s3_server.client().head_bucket(Bucket=bucket)
    s3_server.client().delete_bucket(Bucket=bucket)
