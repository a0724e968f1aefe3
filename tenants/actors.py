"""Who did something: a user, or an API key acting for its creator, seen from one address."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from django.conf import settings

from .models import ApiKey, User


def client_ip(request) -> str | None:
    """The address a request came from, for rate limits and the audit log.

    Each of the TRUSTED_PROXY_COUNT proxies in front of the web process appends the address it
    saw to X-Forwarded-For, so the client is that many entries from the right; entries further
    left were written by the client itself and are never believed. With no trusted proxy the
    header is ignored and the connection's address is the client.
    """
    count = settings.TRUSTED_PROXY_COUNT
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
    if count > 0 and forwarded:
        hops = [hop.strip() for hop in forwarded.split(",")]
        if len(hops) >= count:
            try:
                return str(ipaddress.ip_address(hops[-count]))
            except ValueError:
                pass  # not what a proxy writes: fall back to the connection's address
    return request.META.get("REMOTE_ADDR") or None


@dataclass(frozen=True)
class Actor:
    user: User | None = None
    api_key: ApiKey | None = None
    ip: str | None = None

    @classmethod
    def from_request(cls, request) -> Actor:
        auth = getattr(request, "auth", None)
        return cls(
            user=request.user if request.user.is_authenticated else None,
            api_key=auth if isinstance(auth, ApiKey) else None,
            ip=client_ip(request),
        )

    @property
    def label(self) -> str:
        if self.api_key is not None:
            return f"key {self.api_key.prefix} ({self.api_key.created_by.email})"
        if self.user is not None:
            return self.user.email
        return "system"
