"""Storage quota: each byte written or freed moves the organization's account atomically."""

import logging

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from registry.errors import StorageQuotaExceeded
from registry.models import StorageAccount
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


def _refuse_if_over(account: StorageAccount, adding_bytes: int) -> None:
    if account.used_bytes + adding_bytes > account.quota_bytes:
        raise StorageQuotaExceeded(
            f"This needs {_human(adding_bytes)} but only "
            f"{_human(max(0, account.quota_bytes - account.used_bytes))} of the "
            f"{_human(account.quota_bytes)} storage quota is free. Delete old versions or ask "
            "an operator for a larger quota."
        )


def storage_check(*, organization: Organization, adding_bytes: int) -> None:
    """Refuse early, before any upload work, when the bytes cannot fit (a read: an organization
    without an account yet has the default quota, all free)."""
    account = StorageAccount.objects.for_organization(organization).first() or StorageAccount(
        organization=organization, quota_bytes=settings.STORAGE_QUOTA_DEFAULT_BYTES
    )
    _refuse_if_over(account, adding_bytes)


def storage_charge(*, organization: Organization, delta_bytes: int) -> None:
    """Move used bytes inside the caller's transaction; growth past the quota is refused."""
    assert transaction.get_connection().in_atomic_block, "storage_charge runs inside a transaction"
    storage_account_ensure(organization=organization)
    account = StorageAccount.objects.select_for_update().get(organization=organization)
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
