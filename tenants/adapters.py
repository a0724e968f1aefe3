"""django-allauth hooks: failed logins are counted per client address, as the audit log sees it."""

from allauth.account.adapter import DefaultAccountAdapter
from django.core.exceptions import PermissionDenied

from .actors import client_ip


class AccountAdapter(DefaultAccountAdapter):
    def get_client_ip(self, request) -> str:
        # TRUSTED_PROXY_COUNT, read per request: the same rule as the API's buckets and the audit
        # log, so a proxy in front never makes one failed-login bucket for everyone.
        ip = client_ip(request)
        if not ip:
            raise PermissionDenied("Unable to determine the client's address.")
        return ip
