"""Registry domain errors."""

from tenants.errors import ConflictError, DomainError


class StorageQuotaExceeded(DomainError):
    code = "storage_quota_exceeded"
    status = 400


class UploadSizeMismatch(DomainError):
    """The uploaded object is not the size declared when the upload started."""


class UploadIncomplete(DomainError):
    """Finalize was asked before storage held every part at its reserved size."""

    code = "upload_incomplete"


class UploadNotInParts(DomainError):
    """A parts call on an upload started for one POST."""

    code = "upload_not_in_parts"


class TooManyOpenUploads(ConflictError):
    code = "too_many_open_uploads"


class UploadBeingFinalized(ConflictError):
    code = "upload_being_finalized"


class PromotionGateFailed(ConflictError):
    code = "promotion_gate_failed"


class InvalidArtifact(DomainError):
    code = "invalid_artifact"


class InUseError(ConflictError):
    code = "in_use"


class DatasetVersionNotReady(ConflictError):
    """A dataset version still being checked, or rejected by its check, was asked to be used."""

    code = "dataset_version_not_ready"
