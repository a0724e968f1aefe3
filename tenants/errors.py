"""Typed domain errors; the API's exception handler maps each to a status and a stable code."""


class DomainError(Exception):
    code = "invalid"
    status = 400

    def __init__(self, detail: str, *, fields: dict[str, list[str]] | None = None):
        super().__init__(detail)
        self.detail = detail
        self.fields = fields


class PermissionDeniedError(DomainError):
    code = "permission_denied"
    status = 403


class ConflictError(DomainError):
    code = "conflict"
    status = 409


class LastOwnerError(ConflictError):
    code = "last_owner"


class InvitationInvalidError(DomainError):
    code = "invitation_invalid"


class EmailUnverifiedError(PermissionDeniedError):
    code = "email_unverified"
