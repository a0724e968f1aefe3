"""Writes for the registry: datasets, model versions, aliases, and the storage they use."""

from .code_packages import code_package_version_create
from .datasets import (
    dataset_create,
    dataset_delete,
    dataset_update,
    dataset_version_check,
    dataset_version_checks_resend,
    dataset_version_create,
    dataset_version_upload,
    pending_upload_cancel,
    pending_upload_create,
    pending_upload_finalize,
    pending_upload_part_urls,
    pending_uploads_expire,
)
from .edge_bundles import edge_bundle_register
from .model_versions import (
    model_alias_delete,
    model_alias_set,
    model_version_register,
    registered_model_create,
    registered_model_update,
)
from .storage_accounts import storage_account_ensure

__all__ = [
    "code_package_version_create",
    "dataset_create",
    "dataset_delete",
    "dataset_update",
    "dataset_version_check",
    "dataset_version_checks_resend",
    "dataset_version_create",
    "dataset_version_upload",
    "edge_bundle_register",
    "model_alias_delete",
    "model_alias_set",
    "model_version_register",
    "pending_upload_cancel",
    "pending_upload_create",
    "pending_upload_finalize",
    "pending_upload_part_urls",
    "pending_uploads_expire",
    "registered_model_create",
    "registered_model_update",
    "storage_account_ensure",
]
