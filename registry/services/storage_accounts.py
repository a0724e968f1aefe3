"""Storage quota: each byte written or freed moves the organization's account atomically."""

import logging

from django.conf import settings
from django.db import transaction
from django.db.models import Count, F, Sum
from django.utils import timezone

from registry.errors import StorageQuotaExceeded
from registry.models import PendingUpload, StorageAccount
from registry.selectors import pending_uploads_open
from registry.storage import get_storage
from tenants.models import Organization

logger = logging.getLogger(__name__)


def storage_account_ensure(*, organization: Organization) -> StorageAccount:
    """The organization's account, opened with the default quota if it has none (run when the
    organization is created, and by writes of an organization made elsewhere)."""
    account, _ = StorageAccount.objects.get_or_create(
        organization=organization, defaults={"quota_bytes": settings.STORAGE_QUOTA_DEFAULT_BYTES}
    )
    return account


def _human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _refuse_if_over(
    account: StorageAccount,
    adding_bytes: int,
    *,
    reserved_bytes: int = 0,
    reserved_uploads: int = 0,
) -> None:
    if account.used_bytes + reserved_bytes + adding_bytes <= account.quota_bytes:
        return
    free = max(0, account.quota_bytes - account.used_bytes - reserved_bytes)
    held = (
        f" ({_human(reserved_bytes)} of it held by {reserved_uploads} open "
        f"upload{'' if reserved_uploads == 1 else 's'} until finalized or expired)"
        if reserved_uploads
        else ""
    )
    raise StorageQuotaExceeded(
        f"This needs {_human(adding_bytes)} but only {_human(free)} of the "
        f"{_human(account.quota_bytes)} storage quota is free{held}. Delete old versions or "
        "ask an operator for a larger quota."
    )


def storage_check(
    *,
    organization: Organization,
    adding_bytes: int,
    excluding_upload: PendingUpload | None = None,
) -> None:
    """Refuse early, before any upload work, when the bytes cannot fit beside what is stored and
    what open uploads hold; the upload being finalized, `excluding_upload`, holds the very bytes
    it adds (a read: an organization without an account yet has the default quota, all free)."""
    account = StorageAccount.objects.for_organization(organization).first() or StorageAccount(
        organization=organization, quota_bytes=settings.STORAGE_QUOTA_DEFAULT_BYTES
    )
    open_uploads = pending_uploads_open(organization=organization)
    if excluding_upload is not None:
        open_uploads = open_uploads.exclude(pk=excluding_upload.pk)
    reserved = open_uploads.aggregate(count=Count("pk"), total=Sum("size_bytes"))
    _refuse_if_over(
        account,
        adding_bytes,
        reserved_bytes=reserved["total"] or 0,
        reserved_uploads=reserved["count"],
    )


def storage_account_lock(*, organization: Organization) -> StorageAccount:
    """The organization's account, locked until the caller's transaction ends: writers of its
    bytes and starters of its uploads take turns."""
    assert transaction.get_connection().in_atomic_block, "the lock is held by a transaction"
    storage_account_ensure(organization=organization)
    return StorageAccount.objects.select_for_update().get(organization=organization)


def storage_charge(*, organization: Organization, delta_bytes: int) -> None:
    """Move used bytes inside the caller's transaction; growth past the quota is refused."""
    account = storage_account_lock(organization=organization)
    if delta_bytes > 0:
        _refuse_if_over(account, delta_bytes)
    StorageAccount.objects.filter(pk=account.pk).update(
        used_bytes=F("used_bytes") + delta_bytes, updated_at=timezone.now()
    )


def stored_objects_delete(keys: list[str]) -> None:
    """Remove objects whose rows are gone (or never written); failures are logged, not fatal."""
    storage = get_storage()
    for key in keys:
        try:
            storage.delete(key)
        except Exception:  # an orphan object is left for cleanup; the caller's outcome stands
            logger.exception("could not delete storage object %s", key)


def multipart_uploads_abort(uploads: list[tuple[str, str]]) -> None:
    """Abort multipart uploads (key, upload id) whose rows are gone, dropping the parts they
    hold; failures are logged, and the orphan sweep aborts them later."""
    storage = get_storage()
    for key, upload_id in uploads:
        try:
            storage.multipart_abort(key, upload_id=upload_id)
        except Exception:  # left for the sweep; the caller's outcome stands
            logger.exception("could not abort multipart upload %s of %s", upload_id, key)
