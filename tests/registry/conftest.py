import io
import urllib.error
import urllib.request
import uuid
import zipfile
from urllib.parse import urlsplit

import numpy as np
import pytest
from django.test import TestCase, override_settings
from safetensors.numpy import save as save_safetensors

from registry.models import DatasetVersion
from registry.services import dataset_version_check
from registry.storage import get_storage


@pytest.fixture
def local_store(tmp_path, settings):
    """Local-directory storage under a fresh folder; returns that folder."""
    root = tmp_path / "storage"
    with override_settings(STORAGE_BACKEND="local", STORAGE_LOCAL_ROOT=str(root)):
        get_storage()  # built from the overridden settings
        yield root


def check_uploads() -> list[DatasetVersion]:
    """Run the checks the uploads owe, as a worker does once the outbox has sent them (the
    outbox and the worker themselves are proven with real processes in test_upload_checks);
    returns the versions checked, as the checks left them."""
    checking = DatasetVersion.objects.filter(state=DatasetVersion.State.CHECKING)
    checked = []
    for version_id in checking.order_by("pk").values_list("pk", flat=True):
        # The check deletes a rejected file once its transaction commits.
        with TestCase.captureOnCommitCallbacks(execute=True):
            dataset_version_check(version_id=version_id)
        checked.append(DatasetVersion.objects.get(pk=version_id))
    return checked


def stored_files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def csv_bytes():
    return b"age,city,score\n31,Paris,0.5\n45,Lyon,0.75\n27,Paris,\n"


@pytest.fixture
def weights_bytes():
    return save_safetensors({"linear.weight": np.arange(6, dtype=np.float32).reshape(2, 3)})


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def multipart_form(fields: dict[str, str], body: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body as an HTTP client sends a presigned POST: the fields, then the
    file as `file`. Returns the body and its Content-Type."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="data.csv"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + body
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def post_presigned(client, url: str, fields: dict[str, str], body: bytes) -> int:
    """POST `body` as a presigned form; returns the status. Local storage URLs go through the
    Django test `client`, S3 ones over HTTP to the real server."""
    form, content_type = multipart_form(fields, body)
    parts = urlsplit(url)
    if parts.path.startswith("/storage/local/"):
        return client.generic("POST", parts.path, form, content_type=content_type).status_code
    request = urllib.request.Request(  # noqa: S310  the test S3 server
        url, data=form, method="POST", headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
