"""API rate limits: buckets per API key, per user (per address when anonymous) and per
organization, and stricter per-organization buckets for costly operations.

A view names its costly actions in `throttle_scopes` (action or method -> "submit", "upload",
"predict", "invite"); rates come from the API_RATE_LIMITS setting, read on every request. Each
bucket is a fixed window counted with an atomic increment in the cache (Redis), so parallel
requests cannot all pass on one stale count as they would with a read-then-write history.
"""

from __future__ import annotations

import math
import time

from django.conf import settings
from django.core.cache import cache
from rest_framework.settings import api_settings
from rest_framework.throttling import BaseThrottle

from tenants.actors import client_ip
from tenants.models import ApiKey

_PERIOD_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_rate(rate: str) -> tuple[int, int]:
    """`"60/min"` -> (60 requests, 60 s): DRF's notation, where the unit's first letter counts."""
    count, _, unit = rate.partition("/")
    return int(count), _PERIOD_S[unit.strip()[0].lower()]


def _action(request, view) -> str:
    return getattr(view, "action", None) or request.method.lower()


class _WindowThrottle(BaseThrottle):
    rate_name = ""  # the key of API_RATE_LIMITS

    def bucket(self, request, view) -> str | None:
        """Whose requests share the bucket; None: this throttle does not apply."""
        raise NotImplementedError

    def name(self, request, view) -> str | None:
        return self.rate_name

    def allow_request(self, request, view) -> bool:
        self.retry_after = None
        name = self.name(request, view)
        rate = settings.API_RATE_LIMITS.get(name) if name else None
        bucket = self.bucket(request, view) if rate else None
        if bucket is None:
            return True
        limit, period = parse_rate(rate)
        now = time.time()
        key = f"throttle:{name}:{bucket}:{int(now // period)}"
        cache.add(key, 0, timeout=period + 1)
        try:
            count = cache.incr(key)
        except ValueError:  # evicted between add and incr
            cache.set(key, 1, timeout=period + 1)
            count = 1
        if count <= limit:
            return True
        self.retry_after = max(1, math.ceil(period - now % period))
        return False

    def wait(self) -> float | None:
        return self.retry_after


class ApiKeyThrottle(_WindowThrottle):
    rate_name = "key"

    def bucket(self, request, view):
        auth = getattr(request, "auth", None)
        return str(auth.pk) if isinstance(auth, ApiKey) else None


class UserThrottle(_WindowThrottle):
    """A person's session and keys share one bucket; an anonymous caller has one per address."""

    def name(self, request, view):
        return "user" if request.user.is_authenticated else "anon"

    def bucket(self, request, view):
        if request.user.is_authenticated:
            return str(request.user.pk)
        return client_ip(request)


class OrganizationThrottle(_WindowThrottle):
    """Every key and member of an organization together; resolved only after the membership
    check, so an outsider cannot spend another tenant's bucket."""

    rate_name = "org"

    def bucket(self, request, view):
        organization = getattr(view, "organization", None)
        return str(organization.pk) if organization is not None else None


class CostlyOperationThrottle(OrganizationThrottle):
    """Job submission, uploads, predictions and invitations: one stricter bucket each, shared by
    the whole organization (more keys buy no more of them)."""

    def name(self, request, view):
        return getattr(view, "throttle_scopes", {}).get(_action(request, view))


def throttle_wait(request, view) -> int | None:
    """For pages, which DRF does not throttle: the API's throttles on a Django request; the
    seconds to wait when any bucket is full, else None."""
    waits = []
    for throttle_class in api_settings.DEFAULT_THROTTLE_CLASSES:
        throttle = throttle_class()
        if not throttle.allow_request(request, view):
            waits.append(throttle.wait())
    return max(waits) if waits else None
