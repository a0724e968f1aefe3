"""OpenAPI description of API-key authentication and of the error responses every view shares."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.utils import OpenApiResponse
from rest_framework import permissions, serializers


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = "tenants.api.authentication.ApiKeyAuthentication"
    name = "apiKey"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An organization API key, `<prefix>_<secret>`, from the dashboard.",
        }


class ErrorSerializer(serializers.Serializer):
    """The body of every API error (see `factory_saas.errors.api_exception_handler`)."""

    code = serializers.CharField(help_text="Stable and machine-readable, e.g. `not_found`.")
    detail = serializers.CharField()
    fields = serializers.DictField(
        child=serializers.JSONField(),
        required=False,
        help_text="Messages per invalid field, when the request had invalid fields.",
    )


WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


class ApiAutoSchema(AutoSchema):
    """Documents the errors the exception handler can answer besides each view's success."""

    def _error_responses(self) -> dict[str, str]:
        errors = {"401": "No valid credentials."}
        permission_classes = getattr(self.view, "permission_classes", [])
        if list(permission_classes) != [permissions.IsAuthenticated]:
            errors["403"] = "Your role, key or session does not allow this."
        if "{" in self.path:
            errors["404"] = "No such organization or object, or it belongs to another tenant."
        has_query = any(p.get("in") == "query" for p in self._get_parameters())
        if self.method in WRITE_METHODS or has_query:
            errors["400"] = "The request is not valid; `fields` says which fields and why."
        if self.method in WRITE_METHODS:
            errors["409"] = "The object's current state does not allow this."
        if self._get_request_body() is not None:
            errors["415"] = "The request body's media type is not accepted here."
        return errors

    def _get_response_bodies(self, direction="response"):
        responses = super()._get_response_bodies(direction)
        if direction != "response":
            return responses
        for code, description in self._error_responses().items():
            if code not in responses:
                responses[code] = self._get_response_for_code(
                    OpenApiResponse(ErrorSerializer, description=description),
                    code,
                    media_types=["application/json"],
                    direction=direction,
                )
        return responses
