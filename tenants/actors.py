"""Who did something: a user, or an API key acting for its creator, seen from one address."""

from __future__ import annotations

from dataclasses import dataclass

from .models import ApiKey, User


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
            ip=request.META.get("REMOTE_ADDR") or None,
        )

    @property
    def label(self) -> str:
        if self.api_key is not None:
            return f"key {self.api_key.prefix} ({self.api_key.created_by.email})"
        if self.user is not None:
            return self.user.email
        return "system"
