"""Datasets and their versions: store first, record second, leave nothing behind.

A tenant's upload is stored and recorded at once as a version in `checking`, with its check owed
through the outbox in the same transaction; a worker reads it (`dataset_version_check`) and makes
it `ready` with its schema and profile, or `rejected` with the reason, its object deleted and its
bytes given back. Files the platform writes (a job's predictions) are inspected before they are
recorded, and are ready at once.

Network calls (storage) run outside any transaction; the database rows, the storage charge and
the audit event are written together afterwards, and a failure there deletes the stored object.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from celery import current_app
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Max, Min, Q, Sum
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerError

from outbox.services import handler, message_enqueue
from registry.errors import (
    InUseError,
    TooManyOpenUploads,
    UploadBeingFinalized,
    UploadIncomplete,
    UploadSizeMismatch,
)
from registry.formats import DatasetFormatError, DatasetLimits, check_format, inspect_dataset
from registry.models import Dataset, DatasetVersion, ModelVersion, PendingUpload, name_validator
from registry.selectors import pending_upload_require_parts, pending_uploads_open
from registry.storage import PresignedPost, StorageError, get_storage, new_object_key
from registry.storage.base import (
    MAX_PART_BYTES,
    MAX_PARTS,
    ObjectNotFound,
    UploadNotFound,
)
from tenants.actors import Actor
from tenants.errors import ConflictError, DomainError
from tenants.models import Organization
from tenants.services import audit_record

from .storage_accounts import (
    multipart_uploads_abort,
    storage_account_lock,
    storage_charge,
    storage_check,
    stored_objects_delete,
)

logger = logging.getLogger(__name__)

PENDING_UPLOAD_TTL = timedelta(hours=6)
# Long enough for a finalize to check the size and copy the largest upload inside the store; a
# finalize that died blocks retries of its upload no longer than this.
FINALIZE_CLAIM_TTL = timedelta(minutes=30)
# The check writes its progress at most this often: enough for a page that polls, few writes.
CHECK_PROGRESS_EVERY_S = 0.5
# Of the check's progress, the share that reading the object from storage counts for.
CHECK_DOWNLOAD_SHARE = 0.2
SYSTEM = Actor()


def validate_name(name: str, *, field: str = "name") -> str:
    name = name.strip()
    try:
        name_validator(name)
    except ValidationError as exc:
        raise DomainError(f"{name!r} is not a valid name.", fields={field: exc.messages}) from exc
    return name


def dataset_limits() -> DatasetLimits:
    return DatasetLimits(max_bytes=settings.DATASET_MAX_UPLOAD_BYTES)


@transaction.atomic
def dataset_create(
    *, organization: Organization, name: str, description: str = "", actor: Actor
) -> Dataset:
    name = validate_name(name)
    if Dataset.objects.for_organization(organization).filter(name=name).exists():
        raise ConflictError(
            f"A dataset named {name!r} already exists.", fields={"name": ["Already taken."]}
        )
    dataset = Dataset.objects.create(
        organization=organization, name=name, description=description, created_by=actor.user
    )
    audit_record(organization=organization, actor=actor, action="dataset.create", target=dataset)
    return dataset


@transaction.atomic
def dataset_update(*, dataset: Dataset, description: str, actor: Actor) -> Dataset:
    dataset.description = description
    dataset.save(update_fields=["description"])
    audit_record(
        organization=dataset.organization, actor=actor, action="dataset.update", target=dataset
    )
    return dataset


def dataset_delete(*, dataset: Dataset, actor: Actor) -> None:
    """Delete a dataset and its files, unless a model or another dataset was made from it."""
    with transaction.atomic():
        dataset = Dataset.objects.select_for_update().get(pk=dataset.pk)
        versions = DatasetVersion.objects.for_organization(dataset.organization).filter(
            dataset=dataset
        )
        if ModelVersion.trained_on.through.objects.filter(datasetversion__in=versions).exists() or (
            DatasetVersion.objects.filter(derived_from_dataset_version__in=versions).exists()
        ):
            raise InUseError(
                f"Models or predictions were made from {dataset.name}; delete them first so "
                "their lineage stays whole."
            )
        # A rejected version holds no object and its bytes were given back when it was.
        stored = versions.exclude(state=DatasetVersion.State.REJECTED)
        keys = list(stored.values_list("storage_key", flat=True))
        keys += list(dataset.pending_uploads.values_list("storage_key", flat=True))
        multipart = list(
            dataset.pending_uploads.exclude(multipart_upload_id="").values_list(
                "storage_key", "multipart_upload_id"
            )
        )
        freed = stored.aggregate(total=Sum("size_bytes"))["total"] or 0
        audit_record(
            organization=dataset.organization,
            actor=actor,
            action="dataset.delete",
            target=dataset,
            data={"versions": len(keys), "bytes": freed},
        )
        dataset.delete()
        storage_charge(organization=dataset.organization, delta_bytes=-freed)
        transaction.on_commit(lambda: multipart_uploads_abort(multipart))
        transaction.on_commit(lambda: stored_objects_delete(keys))


def dataset_version_create(
    *,
    dataset: Dataset,
    path: Path,
    filename: str,
    actor: Actor,
    declared_format: str | None = None,
    source: str = DatasetVersion.Source.UPLOAD,
    source_job_id: int | None = None,
    derived_from_model_version: ModelVersion | None = None,
    derived_from_dataset_version: DatasetVersion | None = None,
) -> DatasetVersion:
    """Inspect a file the platform wrote (a job's output), store it under the organization's
    prefix, and record it as a ready version. A tenant's upload goes through
    `dataset_version_upload` instead, which answers before the file is read."""
    organization = dataset.organization
    size = path.stat().st_size
    limits = dataset_limits()
    if size > limits.max_bytes:
        raise DatasetFormatError(
            f"The file is {size} bytes; the limit is {limits.max_bytes}. "
            "Split it into smaller versions."
        )
    storage_check(organization=organization, adding_bytes=size)
    inspection = inspect_dataset(path, limits=limits, declared_format=declared_format or None)
    key = new_object_key(organization_id=organization.pk, kind="datasets", filename=filename)
    with path.open("rb") as stream:
        stored = get_storage().save(key, stream, max_bytes=limits.max_bytes)
    try:
        return _record_version(
            dataset=dataset,
            key=key,
            size=stored.size,
            sha256=stored.sha256,
            filename=filename,
            actor=actor,
            source=source,
            source_job_id=source_job_id,
            derived_from_model_version=derived_from_model_version,
            derived_from_dataset_version=derived_from_dataset_version,
            **_inspected_fields(inspection),
        )
    except BaseException:
        stored_objects_delete([key])
        raise


def dataset_version_upload(
    *, dataset: Dataset, path: Path, filename: str, actor: Actor, declared_format: str | None = None
) -> DatasetVersion:
    """Store a tenant's uploaded file and record it as a version in `checking`, its check owed
    in the same transaction; answers without reading the data.

    What can be told from the file's ends (its size, its format, the declared format) is
    refused here at once; everything else, the whole reading included, is the check's.
    """
    organization = dataset.organization
    limits = dataset_limits()
    storage_check(organization=organization, adding_bytes=path.stat().st_size)
    detected = check_format(path, limits=limits, declared_format=declared_format or None)
    key = new_object_key(organization_id=organization.pk, kind="datasets", filename=filename)
    with path.open("rb") as stream:
        stored = get_storage().save(key, stream, max_bytes=limits.max_bytes)
    try:
        with transaction.atomic():
            return _record_checking(
                dataset=dataset,
                key=key,
                size=stored.size,
                sha256=stored.sha256,
                filename=filename,
                declared_format=declared_format or "",
                detected_format=detected,
                actor=actor,
            )
    except BaseException:
        stored_objects_delete([key])
        raise


def _record_checking(
    *,
    dataset: Dataset,
    key: str,
    size: int,
    sha256: str,
    filename: str,
    declared_format: str,
    actor: Actor,
    detected_format: str = "",
) -> DatasetVersion:
    version = _record_version(
        dataset=dataset,
        key=key,
        size=size,
        sha256=sha256,
        filename=filename,
        actor=actor,
        source=DatasetVersion.Source.UPLOAD,
        state=DatasetVersion.State.CHECKING,
        declared_format=declared_format,
        format=detected_format,
    )
    message_enqueue(
        handler=dataset_version_check_send,
        payload={"version_id": version.pk},
        key=f"dataset_version_check:{version.pk}",
    )
    return version


def _inspected_fields(inspection) -> dict:
    return {
        "format": inspection.format,
        "row_count": inspection.row_count,
        "schema": inspection.schema,
        "profile": inspection.profile,
        "preview": inspection.preview,
        "csv_dialect": inspection.csv_dialect,
    }


@transaction.atomic
def _record_version(
    *,
    dataset: Dataset,
    key: str,
    size: int,
    sha256: str,
    filename: str,
    actor: Actor,
    **fields,
) -> DatasetVersion:
    dataset = Dataset.objects.select_for_update().get(pk=dataset.pk)
    number = (dataset.versions.aggregate(n=Max("number"))["n"] or 0) + 1
    version = DatasetVersion.objects.create(
        organization=dataset.organization,
        dataset=dataset,
        number=number,
        storage_key=key,
        original_filename=filename[:255],
        size_bytes=size,
        sha256=sha256,
        created_by=actor.user,
        **fields,
    )
    storage_charge(organization=dataset.organization, delta_bytes=size)
    audit_record(
        organization=dataset.organization,
        actor=actor,
        action="dataset.version_create",
        target=version,
        data={
            "format": version.format,
            "rows": version.row_count,
            "bytes": size,
            "sha256": sha256,
            "state": version.state,
        },
    )
    return version


@handler(retry_on=(BrokerError, OSError))
def dataset_version_check_send(*, version_id: int) -> None:
    """Hand a version's check to a worker (an outbox handler: sent again while the broker is
    down, so an upload recorded during an outage is still checked once it is back)."""
    current_app.send_task("registry.dataset_version_check", args=[version_id], retry=False)


def dataset_version_checks_resend(*, silent_for: timedelta, now: datetime | None = None) -> int:
    """Owe the check again for versions whose check has been silent for `silent_for` (never
    started, or stopped writing its progress); returns how many.

    A system task across organizations. What it recovers: a check whose message a broker lost
    after the outbox sent it, or whose worker died past the broker's redelivery. A check that
    was only slow runs twice, which its idempotence makes harmless.
    """
    now = now or timezone.now()
    cutoff = now - silent_for
    silent = DatasetVersion.objects.filter(
        state=DatasetVersion.State.CHECKING, check_touched_at__lt=cutoff
    )
    owed = 0
    for version_id in list(silent.order_by("pk").values_list("pk", flat=True)[:500]):
        with transaction.atomic():
            touched = DatasetVersion.objects.filter(
                pk=version_id, state=DatasetVersion.State.CHECKING, check_touched_at__lt=cutoff
            ).update(check_touched_at=now)
            if touched:
                message_enqueue(
                    handler=dataset_version_check_send,
                    payload={"version_id": version_id},
                    key=f"dataset_version_check:{version_id}:{now.isoformat()}",
                )
                owed += 1
    if owed:
        logger.warning("owed %d dataset version checks again after %s of silence", owed, silent_for)
    return owed


def dataset_version_check(*, version_id: int) -> DatasetVersion | None:
    """Read a version in `checking` from storage, as the upload check always did, and make it
    `ready` or `rejected`; None when there is no such version left to check.

    Idempotent: a version already decided (a check delivered twice) is left as it is, and of
    two checks running at once only the first to finish writes. A storage outage raises
    StorageError for the caller to try again; anything else the file makes go wrong rejects it.
    """
    version = (
        DatasetVersion.objects.select_related("dataset", "organization")
        .filter(pk=version_id, state=DatasetVersion.State.CHECKING)
        .first()
    )
    if version is None:
        return None
    progress = _ProgressWriter(version.pk)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "data"
            sha256 = _download_checked(version, path, progress)
            inspection = inspect_dataset(
                path,
                limits=dataset_limits(),
                declared_format=version.declared_format or None,
                progress=progress.part(CHECK_DOWNLOAD_SHARE, 1.0),
            )
    except (DatasetFormatError, UploadSizeMismatch) as exc:
        return _check_reject(version_id=version.pk, reason=exc.detail)
    except ObjectNotFound:
        return _check_reject(
            version_id=version.pk, reason="The uploaded file is gone from storage; upload it again."
        )
    except StorageError:
        raise
    except SoftTimeLimitExceeded:
        return _check_reject(
            version_id=version.pk,
            reason="The file took too long to check; split it into smaller versions.",
        )
    except Exception:
        # A file that breaks the readers in a way they do not name is refused all the same:
        # refusing is safe, and the log keeps the details for a fix.
        logger.exception("checking dataset version %s failed", version.pk)
        return _check_reject(
            version_id=version.pk,
            reason="The file could not be read as a dataset; export it again and re-upload.",
        )
    return _check_accept(version_id=version.pk, sha256=sha256, inspection=inspection)


def _download_checked(version: DatasetVersion, path: Path, progress: _ProgressWriter) -> str:
    """Copy the version's object to `path`; its sha256. Its size must be the one recorded, and
    its hash too when the upload recorded one."""
    digest = hashlib.sha256()
    read = 0
    report = progress.part(0.0, CHECK_DOWNLOAD_SHARE)
    with get_storage().open(version.storage_key) as source, path.open("wb") as target:
        for chunk in iter(lambda: source.read(8 * 1024 * 1024), b""):
            digest.update(chunk)
            target.write(chunk)
            read += len(chunk)
            if read > version.size_bytes:
                break
            report(read / max(version.size_bytes, 1))
    if read != version.size_bytes:
        raise UploadSizeMismatch(
            f"{read} bytes were stored, but {version.size_bytes} were uploaded; upload the file "
            "again."
        )
    sha256 = digest.hexdigest()
    if version.sha256 and sha256 != version.sha256:
        raise UploadSizeMismatch("The stored file is not the one uploaded; upload it again.")
    return sha256


class _ProgressWriter:
    """Writes the check's progress on the version, at most every CHECK_PROGRESS_EVERY_S."""

    def __init__(self, version_id: int) -> None:
        self.version_id = version_id
        self._written_at = 0.0

    def part(self, start: float, end: float) -> Callable[[float], None]:
        """A callback for one step of the check, mapping its 0..1 onto `start`..`end`."""
        return lambda fraction: self.write(start + (end - start) * fraction)

    def write(self, fraction: float) -> None:
        now = time.monotonic()
        if now - self._written_at < CHECK_PROGRESS_EVERY_S:
            return
        self._written_at = now
        DatasetVersion.objects.filter(
            pk=self.version_id, state=DatasetVersion.State.CHECKING
        ).update(check_progress=min(max(fraction, 0.0), 1.0), check_touched_at=timezone.now())


def _checking_locked(version_id: int) -> DatasetVersion | None:
    """The version, locked, while it is still being checked; None once a check decided it (a
    check delivered twice decides once)."""
    return (
        DatasetVersion.objects.select_for_update()
        .filter(pk=version_id, state=DatasetVersion.State.CHECKING)
        .first()
    )


@transaction.atomic
def _check_accept(*, version_id: int, sha256: str, inspection) -> DatasetVersion | None:
    version = _checking_locked(version_id)
    if version is None:
        return None
    for field, value in _inspected_fields(inspection).items():
        setattr(version, field, value)
    version.sha256 = sha256
    version.state = DatasetVersion.State.READY
    version.check_progress = 1.0
    version.save()
    audit_record(
        organization=version.organization,
        actor=SYSTEM,
        action="dataset.version_ready",
        target=version,
        data={"format": version.format, "rows": version.row_count, "sha256": sha256},
    )
    return version


@transaction.atomic
def _check_reject(*, version_id: int, reason: str) -> DatasetVersion | None:
    """Reject a version: its reason kept for the uploader, its object deleted once this commits
    (the orphan sweep takes it should that fail: no row refers to it any more), its bytes given
    back."""
    version = _checking_locked(version_id)
    if version is None:
        return None
    key = version.storage_key
    version.state = DatasetVersion.State.REJECTED
    version.rejection_reason = reason
    version.storage_key = None
    version.save()
    storage_charge(organization=version.organization, delta_bytes=-version.size_bytes)
    audit_record(
        organization=version.organization,
        actor=SYSTEM,
        action="dataset.version_reject",
        target=version,
        data={"reason": reason, "bytes": version.size_bytes},
    )
    transaction.on_commit(lambda: stored_objects_delete([key]))
    return version


def pending_upload_create(
    *,
    dataset: Dataset,
    filename: str,
    size_bytes: int,
    declared_format: str = "",
    actor: Actor,
    parts: bool = False,
    part_size_bytes: int | None = None,
) -> tuple[PendingUpload, PresignedPost | None]:
    """Reserve a key for a large upload sent straight to storage; returns it with the form to
    POST the file to, which the store accepts only at exactly `size_bytes`, or, with `parts`,
    with no form: the upload is a multipart upload in storage, its parts PUT to URLs from
    `pending_upload_part_urls`, each of them signed for its exact size.

    Until finalized or expired, the upload holds its declared size of the quota and one of the
    organization's few open-upload places: bytes can land under its key before anything is billed.
    """
    part_size = _part_size(size_bytes=size_bytes, requested=part_size_bytes) if parts else None
    upload = _pending_upload_reserve(
        dataset=dataset,
        filename=filename,
        size_bytes=size_bytes,
        declared_format=declared_format,
        actor=actor,
        part_size_bytes=part_size,
    )
    storage = get_storage()
    if not parts:
        form = storage.presigned_post(
            upload.storage_key, size_bytes=size_bytes, expires_s=_seconds_left(upload)
        )
        return upload, form
    # Started after the reservation commits (no network call inside a transaction); an upload
    # started and never recorded (this process dying here) is aborted by the orphan sweep.
    try:
        upload_id = storage.multipart_start(upload.storage_key)
    except BaseException:
        PendingUpload.objects.filter(pk=upload.pk).delete()
        raise
    PendingUpload.objects.filter(pk=upload.pk).update(multipart_upload_id=upload_id)
    upload.multipart_upload_id = upload_id
    return upload, None


def _part_size(*, size_bytes: int, requested: int | None) -> int:
    """The size of every part but the last: the one asked for, or the default, grown where the
    file would otherwise need more than the store's 10,000 parts."""
    smallest = settings.DATASET_UPLOAD_PART_MIN_BYTES
    part_size = requested or settings.DATASET_UPLOAD_PART_BYTES
    if not smallest <= part_size <= MAX_PART_BYTES:
        message = f"Between {smallest} and {MAX_PART_BYTES} bytes."
        raise DomainError(
            f"A part must be between {smallest} and {MAX_PART_BYTES} bytes, not {part_size}.",
            fields={"part_size_bytes": [message]},
        )
    if size_bytes == 0:
        raise DomainError(
            "An empty file has no parts; start it as a single upload.",
            fields={"parts": ["Not for an empty file."]},
        )
    return max(part_size, -(-size_bytes // MAX_PARTS))


@transaction.atomic
def _pending_upload_reserve(
    *,
    dataset: Dataset,
    filename: str,
    size_bytes: int,
    declared_format: str,
    actor: Actor,
    part_size_bytes: int | None,
) -> PendingUpload:
    limit = dataset_limits().max_bytes
    if size_bytes > limit:
        raise DatasetFormatError(
            f"The file is {size_bytes} bytes; the limit is {limit}. Split it into versions.",
            fields={"size_bytes": [f"At most {limit}."]},
        )
    organization = dataset.organization
    # Concurrent starts take turns, so together they cannot pass the cap or the quota.
    storage_account_lock(organization=organization)
    open_uploads = pending_uploads_open(organization=organization)
    opened = open_uploads.count()
    if opened >= settings.STORAGE_MAX_OPEN_UPLOADS:
        first_expiry = open_uploads.aggregate(first=Min("expires_at"))["first"]
        raise TooManyOpenUploads(
            f"{opened} uploads are open in this organization, the most it may hold at once. "
            "Finalize one, or start this one after the oldest expires at "
            f"{first_expiry:%Y-%m-%d %H:%M} UTC."
        )
    storage_check(organization=organization, adding_bytes=size_bytes)
    return PendingUpload.objects.create(
        organization=organization,
        dataset=dataset,
        # In parts, the key is the version's to be: only completing the upload writes there.
        storage_key=new_object_key(
            organization_id=organization.pk,
            kind="uploads" if part_size_bytes is None else "datasets",
            filename=filename,
        ),
        original_filename=filename[:255],
        declared_format=declared_format,
        size_bytes=size_bytes,
        part_size_bytes=part_size_bytes,
        created_by=actor.user,
        expires_at=timezone.now() + PENDING_UPLOAD_TTL,
    )


def pending_upload_part_urls(*, upload: PendingUpload, numbers: list[int]) -> list[dict]:
    """Where to PUT each of the upload's parts `numbers`, with the exact size each must have
    (the store refuses any other); valid until the upload expires."""
    pending_upload_require_parts(upload)
    count = upload.part_count
    outside = sorted({number for number in numbers if not 1 <= number <= count})
    if outside:
        message = f"This upload has parts 1 to {count}; there is no part {outside[0]}."
        raise DomainError(message, fields={"numbers": [message]})
    expires_s = _seconds_left(upload)
    storage = get_storage()
    return [
        {
            "number": number,
            "size_bytes": upload.part_size(number),
            "url": storage.multipart_part_url(
                upload.storage_key,
                upload_id=upload.multipart_upload_id,
                number=number,
                size_bytes=upload.part_size(number),
                expires_s=expires_s,
            ),
        }
        for number in sorted(set(numbers))
    ]


@transaction.atomic
def pending_upload_cancel(*, upload: PendingUpload, actor: Actor) -> None:
    """Give up an upload: its place and its reserved quota are freed at once, and what storage
    holds for it (its parts, or its object) is dropped once this commits."""
    locked = PendingUpload.objects.select_for_update().filter(pk=upload.pk).first()
    if locked is None:
        raise ConflictError("This upload was already finalized or discarded.")
    if locked.finalize_claimed_until and locked.finalize_claimed_until > timezone.now():
        raise UploadBeingFinalized("A finalize of this upload is running; wait for its answer.")
    audit_record(
        organization=locked.organization,
        actor=actor,
        action="dataset.upload_cancel",
        target=locked.dataset,
        data={"upload": locked.pk, "bytes": locked.size_bytes, "parts": locked.part_count},
    )
    locked.delete()
    transaction.on_commit(lambda: _release_stored(locked))


def _seconds_left(upload: PendingUpload) -> int:
    left = int((upload.expires_at - timezone.now()).total_seconds())
    if left < 1:
        raise DomainError("This upload expired; start a new one.")
    return left


def pending_upload_finalize(*, upload: PendingUpload, actor: Actor) -> DatasetVersion:
    """Copy what the client uploaded to a fresh key and record the copy as a version in
    `checking`, its check owed in the same transaction; answers without reading the data.

    The upload's key stays writable through its URL until that expires (S3 cannot revoke a
    presigned POST); the version's key never was, and what the check hashes and reads is the
    copy, so a write racing the finalize changes nothing. A finalize first claims the
    upload, so a second one sent meanwhile is refused before it copies anything. Bytes that can
    never become a version discard the upload; any other refusal releases the claim for a retry.
    """
    if upload.expires_at <= timezone.now():
        _discard_upload(upload)
        raise DomainError("This upload expired; start a new one.")
    claim = _claim_for_finalize(upload)
    finalize = _finalize_parts_claimed if upload.in_parts else _finalize_claimed
    try:
        return finalize(upload=upload, claim=claim, actor=actor)
    except (DatasetFormatError, UploadSizeMismatch):
        _discard_upload(upload)
        raise
    except ConflictError:
        raise  # another finalize took the upload over; the claim is no longer ours to release
    except BaseException:
        PendingUpload.objects.filter(pk=upload.pk, finalize_claimed_until=claim).update(
            finalize_claimed_until=None
        )
        raise


def _claim_for_finalize(upload: PendingUpload) -> datetime:
    """Mark the upload as being finalized until the returned time, which is also the claim's
    token: only the finalize holding that value may record or release it."""
    now = timezone.now()
    claim = now + FINALIZE_CLAIM_TTL
    claimed = (
        PendingUpload.objects.filter(pk=upload.pk)
        .filter(Q(finalize_claimed_until__isnull=True) | Q(finalize_claimed_until__lte=now))
        .update(finalize_claimed_until=claim)
    )
    if claimed:
        return claim
    held = PendingUpload.objects.filter(pk=upload.pk).first()
    if held is None:
        raise ConflictError("This upload was already finalized or discarded.")
    lapses = held.finalize_claimed_until or now
    raise UploadBeingFinalized(
        "Another request is finalizing this upload; wait for its answer. Should that request "
        f"have died, finalize again after {lapses:%Y-%m-%d %H:%M:%S} UTC."
    )


def _finalize_claimed(*, upload: PendingUpload, claim: datetime, actor: Actor) -> DatasetVersion:
    storage = get_storage()
    uploaded_size = storage.size(upload.storage_key)
    if uploaded_size is None:
        raise DomainError(
            "Nothing was uploaded yet: POST the file to the upload URL with its fields, "
            "then finalize."
        )
    if uploaded_size != upload.size_bytes:
        raise _size_mismatch(upload, uploaded_size)
    storage_check(
        organization=upload.organization, adding_bytes=upload.size_bytes, excluding_upload=upload
    )
    key = new_object_key(
        organization_id=upload.organization_id, kind="datasets", filename=upload.original_filename
    )
    storage.copy(upload.storage_key, key)
    try:
        version = _record_claimed(upload=upload, claim=claim, key=key, actor=actor)
    except BaseException:
        stored_objects_delete([key])
        raise
    stored_objects_delete([upload.storage_key])
    return version


def _finalize_parts_claimed(
    *, upload: PendingUpload, claim: datetime, actor: Actor
) -> DatasetVersion:
    """Complete the upload from the parts storage reports, each checked against its reserved
    number and size (the client's word on them is never asked), and record the object as a
    version in `checking`. Parts missing or of another size: a 400 naming them, and nothing
    written, so the client sends those and finalizes again."""
    storage = get_storage()
    key = upload.storage_key
    try:
        held = storage.multipart_parts(key, upload_id=upload.multipart_upload_id)
    except UploadNotFound:
        # An earlier finalize completed the upload and died before recording it: the object
        # is whole (only completing writes under this key). Anything else means it was lost.
        if storage.size(key) != upload.size_bytes:
            raise UploadSizeMismatch(
                "The upload's parts are gone from storage; start a new upload."
            ) from None
    else:
        by_number = {part.number: part for part in held}
        numbers = range(1, upload.part_count + 1)
        owed = [
            number
            for number in numbers
            if number not in by_number or by_number[number].size != upload.part_size(number)
        ]
        if owed:
            listed = ", ".join(map(str, owed[:20])) + (", ..." if len(owed) > 20 else "")
            raise UploadIncomplete(
                f"{len(owed)} of {upload.part_count} parts are missing or not their reserved "
                f"size: send part {listed}, then finalize again.",
                fields={"parts": [f"Send part {listed}."]},
            )
        storage_check(
            organization=upload.organization,
            adding_bytes=upload.size_bytes,
            excluding_upload=upload,
        )
        storage.multipart_complete(
            key,
            upload_id=upload.multipart_upload_id,
            parts=[by_number[number] for number in numbers],
        )
        stored = storage.size(key)
        if stored != upload.size_bytes:
            raise _size_mismatch(upload, stored or 0)
    # A failure from here leaves the object and the row: a finalize sent again records it, and
    # an upload left to expire is swept, object and all.
    return _record_claimed(upload=upload, claim=claim, key=key, actor=actor)


@transaction.atomic
def _record_claimed(
    *, upload: PendingUpload, claim: datetime, key: str, actor: Actor
) -> DatasetVersion:
    """Record the object under `key` as the upload's version in `checking` and forget the
    upload, if this finalize still holds its claim (one that lapsed while storage was busy may
    have been taken by a later finalize). Its size and hash are the check's to find: the check
    reads the object whole anyway."""
    if (
        not PendingUpload.objects.select_for_update()
        .filter(pk=upload.pk, finalize_claimed_until=claim)
        .exists()
    ):
        raise ConflictError("This upload was finalized by another request.")
    version = _record_checking(
        dataset=upload.dataset,
        key=key,
        size=upload.size_bytes,
        sha256="",
        filename=upload.original_filename,
        declared_format=upload.declared_format,
        actor=actor,
    )
    PendingUpload.objects.filter(pk=upload.pk).delete()
    return version


def pending_uploads_expire(*, before: datetime) -> int:
    """Forget uploads that expired before `before` without being finalized, aborting their
    multipart uploads so storage drops the parts; returns how many were forgotten.

    A system task across organizations. Objects sent in one POST (never billed) are left for
    the orphan sweep, which deletes what no row refers to. An upload whose abort fails keeps its
    row, so the next run tries again.
    """
    expired = PendingUpload.objects.filter(expires_at__lt=before)
    storage = get_storage()
    kept = []
    for pk, key, upload_id in expired.exclude(multipart_upload_id="").values_list(
        "pk", "storage_key", "multipart_upload_id"
    ):
        try:
            storage.multipart_abort(key, upload_id=upload_id)
        except StorageError:
            logger.warning("could not abort multipart upload %s of %s; next sweep", upload_id, key)
            kept.append(pk)
    deleted, _ = expired.exclude(pk__in=kept).delete()
    return deleted


def _size_mismatch(upload: PendingUpload, size: int) -> UploadSizeMismatch:
    return UploadSizeMismatch(
        f"{size} bytes were uploaded, but {upload.size_bytes} were declared; "
        "start a new upload with the file's exact size."
    )


def _discard_upload(upload: PendingUpload) -> None:
    PendingUpload.objects.filter(pk=upload.pk).delete()
    _release_stored(upload)


def _release_stored(upload: PendingUpload) -> None:
    """Drop what storage holds for an upload whose row is gone: its parts, and its object."""
    if upload.multipart_upload_id:
        multipart_uploads_abort([(upload.storage_key, upload.multipart_upload_id)])
    stored_objects_delete([upload.storage_key])
