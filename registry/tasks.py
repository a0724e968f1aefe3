"""Celery entry points of the registry (thin: each calls one service)."""

from datetime import timedelta

from celery import shared_task
from django.conf import settings

from registry import services
from registry.storage import StorageError


@shared_task(
    name="registry.dataset_version_check",
    ignore_result=True,
    # The largest upload (DATASET_MAX_UPLOAD_BYTES) read at a few tens of MB/s, with room; a
    # check past the soft limit rejects the file, saying so.
    soft_time_limit=1800,
    time_limit=1900,
    autoretry_for=(StorageError,),
    retry_backoff=True,
    retry_backoff_max=600,
    max_retries=10,
)
def dataset_version_check(version_id: int) -> None:
    services.dataset_version_check(version_id=version_id)


@shared_task(
    name="registry.dataset_version_checks_resend",
    ignore_result=True,
    soft_time_limit=60,
    time_limit=90,
)
def dataset_version_checks_resend() -> int:
    return services.dataset_version_checks_resend(
        silent_for=timedelta(seconds=settings.DATASET_CHECK_SILENT_S)
    )
