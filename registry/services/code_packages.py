"""Code packages: check the archive and its manifest first, store second, record last.

The same order and clean-up as dataset versions (registry.services.datasets): storage is written
outside any transaction, the version row, the storage charge and the audit event together after,
and a refusal at any step leaves no row and no object behind.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import Max

from registry.formats.base import DatasetLimits
from registry.formats.code_packages import (
    CodePackageError,
    CodePackageInspection,
    inspect_code_package,
)
from registry.models import CodePackage, CodePackageVersion
from registry.storage import get_storage, new_object_key
from tenants.actors import Actor
from tenants.models import Organization
from tenants.services import audit_record

from .storage_accounts import storage_charge, storage_check, stored_objects_delete

# A package is a folder of source files: far fewer entries, and far less expansion, than data.
MAX_PACKAGE_FILES = 10_000
MAX_PACKAGE_EXPANDED_BYTES = 1024**3


def code_package_limits() -> DatasetLimits:
    return DatasetLimits(
        max_bytes=settings.CODE_PACKAGE_MAX_UPLOAD_BYTES,
        max_archive_entries=MAX_PACKAGE_FILES,
        max_uncompressed_bytes=MAX_PACKAGE_EXPANDED_BYTES,
    )


def code_package_version_create(
    *,
    organization: Organization,
    path: Path,
    filename: str,
    actor: Actor,
    expected_sha256: str | None = None,
) -> CodePackageVersion:
    """Check the archive at `path`, store it, and record it as the next version of the package
    its manifest names (created on its first upload).

    `expected_sha256`, when the client sends it, must be the digest of the bytes that arrived:
    a truncated or altered upload is refused before anything is stored.
    """
    size = path.stat().st_size
    limits = code_package_limits()
    if size > limits.max_bytes:
        raise CodePackageError(
            f"The package is {size:,} bytes; the limit is {limits.max_bytes:,}. Leave data and "
            "weights out of it: upload them as datasets and models."
        )
    if expected_sha256 is not None:
        _check_digest(path, expected_sha256)
    storage_check(organization=organization, adding_bytes=size)
    inspection = inspect_code_package(path, limits=limits)
    key = new_object_key(organization_id=organization.pk, kind="code", filename=filename)
    with path.open("rb") as stream:
        stored = get_storage().save(key, stream, max_bytes=limits.max_bytes)
    try:
        return _record_version(
            organization=organization,
            key=key,
            size=stored.size,
            sha256=stored.sha256,
            filename=filename,
            inspection=inspection,
            actor=actor,
        )
    except BaseException:
        stored_objects_delete([key])
        raise


def _check_digest(path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1024 * 1024), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected.lower():
        raise CodePackageError(
            f"The uploaded bytes have sha256 {digest.hexdigest()}, not the {expected} sent with "
            "them; the upload was cut short or changed on the way. Upload it again.",
            fields={"sha256": ["does not match the uploaded bytes"]},
        )


@transaction.atomic
def _record_version(
    *,
    organization: Organization,
    key: str,
    size: int,
    sha256: str,
    filename: str,
    inspection: CodePackageInspection,
    actor: Actor,
) -> CodePackageVersion:
    name = inspection.manifest["package"]["name"]
    package, created = CodePackage.objects.get_or_create(
        organization=organization, name=name, defaults={"created_by": actor.user}
    )
    if created:
        audit_record(
            organization=organization, actor=actor, action="code_package.create", target=package
        )
    # Concurrent uploads of one package take turns for the next number.
    package = CodePackage.objects.select_for_update().get(pk=package.pk)
    number = (package.versions.aggregate(n=Max("number"))["n"] or 0) + 1
    version = CodePackageVersion.objects.create(
        organization=organization,
        package=package,
        number=number,
        storage_key=key,
        original_filename=filename[:255],
        archive_format=inspection.archive_format,
        size_bytes=size,
        sha256=sha256,
        manifest=inspection.manifest,
        created_by=actor.user,
    )
    storage_charge(organization=organization, delta_bytes=size)
    audit_record(
        organization=organization,
        actor=actor,
        action="code_package.version_create",
        target=version,
        data={
            "bytes": size,
            "sha256": sha256,
            "files": inspection.file_count,
            "train": inspection.manifest["entry"]["train"],
            "runtime": inspection.manifest["runtime"]["name"],
        },
    )
    return version
