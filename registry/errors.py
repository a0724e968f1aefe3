"""Registry domain errors."""

from tenants.errors import ConflictError, DomainError


class StorageQuotaExceeded(DomainError):
    code = "storage_quota_exceeded"
    status = 400


class PromotionGateFailed(ConflictError):
    code = "promotion_gate_failed"


class InvalidArtifact(DomainError):
    code = "invalid_artifact"


class InUseError(ConflictError):
    code = "in_use"
