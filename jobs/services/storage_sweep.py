"""Deleting stored objects that no row refers to: the storage leaks a crash or an outage leaves.

Objects are written before the row that records them (a checkpoint, a model's files, an upload),
and deleted after the row that dropped them commits; a worker killed in between, or a delete
that failed while the store was down, leaves an object nobody refers to. Only objects older than
`older_than` are considered, so a write still on its way to its row is never taken.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.utils import timezone

from jobs.models import Job
from registry.models import (
    CodePackageVersion,
    DatasetVersion,
    EdgeBundle,
    ModelArtifact,
    PendingUpload,
)
from registry.services import pending_uploads_expire
from registry.storage import StorageError, get_storage
from tenants.models import Organization

logger = logging.getLogger(__name__)

CHUNK = 1000
# Every row that holds a storage key, and the field holding it.
REFERENCES = (
    (DatasetVersion, "storage_key"),
    (ModelArtifact, "storage_key"),
    (EdgeBundle, "storage_key"),
    (PendingUpload, "storage_key"),
    (CodePackageVersion, "storage_key"),
    (Job, "checkpoint_key"),
)


def storage_orphans_sweep(*, older_than: timedelta, now: datetime | None = None) -> list[str]:
    """Delete objects older than `older_than` that no row refers to; returns their keys.

    A system task across every organization, one key prefix (orgs/<id>/) at a time.
    """
    cutoff = (now or timezone.now()) - older_than
    # An upload abandoned past its expiry can no longer be finalized; without its row, what was
    # sent to it (unbilled) is an orphan like any other.
    pending_uploads_expire(before=cutoff)
    storage = get_storage()
    _abandoned_multipart_uploads_abort(storage, cutoff=cutoff)
    candidates = [
        key
        for organization_id in Organization.objects.order_by("pk").values_list("pk", flat=True)
        for key, written in storage.list(f"orgs/{organization_id}/")
        if written < cutoff
    ]
    orphans = []
    for start in range(0, len(candidates), CHUNK):
        chunk = candidates[start : start + CHUNK]
        referenced: set[str] = set()
        for model, field in REFERENCES:
            referenced.update(
                model.objects.filter(**{f"{field}__in": chunk}).values_list(field, flat=True)
            )
        orphans.extend(key for key in chunk if key not in referenced)
    deleted = []
    for key in orphans:
        try:
            storage.delete(key)
        except StorageError:
            logger.warning("orphan %s not deleted; the next sweep tries again", key)
        else:
            deleted.append(key)
    if deleted:
        logger.info("deleted %d orphan objects, e.g. %s", len(deleted), deleted[0])
    return deleted


def _abandoned_multipart_uploads_abort(storage, *, cutoff: datetime) -> None:
    """Abort multipart uploads started before `cutoff` that no pending upload holds: one whose
    row was deleted while its abort failed, or whose start died before recording its id. Their
    parts are not objects, so the listing below never sees them."""
    for organization_id in Organization.objects.order_by("pk").values_list("pk", flat=True):
        started = [
            (key, upload_id)
            for key, upload_id, initiated in storage.multipart_uploads(f"orgs/{organization_id}/")
            if initiated < cutoff
        ]
        held = set(
            PendingUpload.objects.filter(
                multipart_upload_id__in=[upload_id for _key, upload_id in started]
            ).values_list("multipart_upload_id", flat=True)
        )
        for key, upload_id in started:
            if upload_id in held:
                continue
            try:
                storage.multipart_abort(key, upload_id=upload_id)
            except StorageError:
                logger.warning("multipart upload %s of %s not aborted; next sweep", upload_id, key)
            else:
                logger.info("aborted abandoned multipart upload %s of %s", upload_id, key)
