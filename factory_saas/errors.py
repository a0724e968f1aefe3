"""One exception handler: every API error is JSON `{"code", "detail", "fields"?}`."""

from django.core.exceptions import PermissionDenied
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler

from registry.storage.base import StorageError
from tenants.errors import DomainError

# Seconds a client is told to wait when the object store did not answer.
STORAGE_RETRY_AFTER_S = 30


def _flatten(detail) -> str:
    if isinstance(detail, list):
        return " ".join(_flatten(item) for item in detail)
    if isinstance(detail, dict):
        return " ".join(f"{key}: {_flatten(value)}" for key, value in detail.items())
    return str(detail)


def api_exception_handler(exc, context):
    if isinstance(exc, DomainError):
        body = {"code": exc.code, "detail": exc.detail}
        if exc.fields:
            body["fields"] = exc.fields
        # A refusal that passes with time (a replica starting) says when to come back.
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            body["retry_after"] = retry_after
        response = Response(body, status=exc.status)
        if retry_after is not None:
            response["Retry-After"] = str(retry_after)
        return response
    if isinstance(exc, StorageError):
        # An outage of the store, not a bug of ours nor of the request: say so, and when to
        # come back. What the request had written is rolled back with its transaction.
        response = Response(
            {
                "code": "storage_unavailable",
                "detail": "The object store did not answer; nothing was changed. Try again "
                "shortly.",
            },
            status=status.HTTP_503_SERVICE_UNAVAILABLE,
        )
        response["Retry-After"] = str(STORAGE_RETRY_AFTER_S)
        return response
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    response = exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        fields = exc.detail if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail}
        response.data = {
            "code": "invalid",
            "detail": "Some fields are not valid: " + ", ".join(fields) + ".",
            "fields": fields,
        }
        response.status_code = status.HTTP_400_BAD_REQUEST
    else:
        codes = exc.get_codes() if isinstance(exc, exceptions.APIException) else "error"
        response.data = {
            "code": codes if isinstance(codes, str) else "error",
            "detail": _flatten(response.data.get("detail", response.data)),
        }
    return response
