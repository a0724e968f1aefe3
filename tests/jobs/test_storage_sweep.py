"""The orphan sweep: objects no row refers to are deleted once old enough, nothing else."""

import io
from datetime import timedelta

import pytest
from django.utils import timezone

from jobs.services.storage_sweep import storage_orphans_sweep
from registry.models import PendingUpload
from registry.storage import new_object_key
from tests.factories import DatasetVersionFactory, JobFactory, PendingUploadFactory

pytestmark = pytest.mark.django_db

HOUR = timedelta(hours=1)


@pytest.fixture(params=["local", "s3"])
def storage(request):
    return request.getfixturevalue(f"{request.param}_storage")


def _store(storage, org, kind: str) -> str:
    key = new_object_key(organization_id=org.pk, kind=kind, filename="x.bin")
    storage.save(key, io.BytesIO(b"bytes"))
    return key


def test_objects_without_a_row_are_deleted_once_old_enough(storage, org):
    dataset_key = _store(storage, org, "datasets")
    DatasetVersionFactory(organization=org, storage_key=dataset_key)
    checkpoint_key = _store(storage, org, "checkpoints")
    JobFactory(organization=org, checkpoint_key=checkpoint_key)
    orphan = _store(storage, org, "checkpoints")

    # Just written: maybe a write on its way to its row, so nothing is taken yet.
    assert storage_orphans_sweep(older_than=HOUR) == []
    later = timezone.now() + 2 * HOUR
    assert storage_orphans_sweep(older_than=HOUR, now=later) == [orphan]
    assert storage.size(orphan) is None
    assert storage.size(dataset_key) == storage.size(checkpoint_key) == 5
    assert storage_orphans_sweep(older_than=HOUR, now=later) == []


def test_an_upload_abandoned_past_its_expiry_is_forgotten_and_its_object_deleted(storage, org):
    now = timezone.now()
    abandoned = PendingUploadFactory(organization=org, expires_at=now - 2 * HOUR)
    storage.save(abandoned.storage_key, io.BytesIO(b"never finalized"))
    open_upload = PendingUploadFactory(organization=org, expires_at=now + 3 * HOUR)
    storage.save(open_upload.storage_key, io.BytesIO(b"on its way"))

    deleted = storage_orphans_sweep(older_than=HOUR, now=now + 2 * HOUR)

    assert deleted == [abandoned.storage_key]
    assert storage.size(abandoned.storage_key) is None
    assert list(PendingUpload.objects.values_list("pk", flat=True)) == [open_upload.pk]
    assert storage.size(open_upload.storage_key) == len(b"on its way")


def test_a_code_package_versions_archive_is_not_an_orphan(storage, org):
    from registry.models import CodePackage, CodePackageVersion

    key = _store(storage, org, "code")
    package = CodePackage.objects.create(organization=org, name="kept")
    CodePackageVersion.objects.create(
        organization=org,
        package=package,
        number=1,
        storage_key=key,
        archive_format="zip",
        size_bytes=5,
        sha256="0" * 64,
        manifest={},
    )
    orphan = _store(storage, org, "code")

    assert storage_orphans_sweep(older_than=HOUR, now=timezone.now() + 2 * HOUR) == [orphan]
    assert storage.size(key) == 5
