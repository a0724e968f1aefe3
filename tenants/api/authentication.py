"""`Authorization: Bearer <prefix>_<secret>` authentication for API keys."""

from rest_framework import authentication, exceptions

from tenants.selectors import api_key_get_by_token
from tenants.services import api_key_mark_used


class ApiKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"
    key_lookup = staticmethod(api_key_get_by_token)  # bench/load_urls.py times another

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].lower() != self.keyword.lower().encode():
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("Send the key as `Authorization: Bearer <key>`.")
        try:
            token = header[1].decode()
        except UnicodeDecodeError as exc:
            raise exceptions.AuthenticationFailed("The API key is not valid.") from exc
        api_key = self.key_lookup(token=token)
        if api_key is None or not api_key.created_by.is_active:
            raise exceptions.AuthenticationFailed("The API key is not valid.")
        if api_key.revoked_at is not None:
            raise exceptions.AuthenticationFailed("This API key was revoked.")
        if not api_key.is_active:
            raise exceptions.AuthenticationFailed("This API key has expired.")
        api_key_mark_used(api_key=api_key)
        return api_key.created_by, api_key

    def authenticate_header(self, request):
        return self.keyword
