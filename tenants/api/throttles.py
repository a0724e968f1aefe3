"""API rate limits: buckets per API key, per user (per address when anonymous) and per
organization, and stricter buckets for costly operations.

A request counts in all of its buckets or in none. They are taken in order, the caller's own
first; the first full one refuses the request and gives back what the ones before it took. So a
key sent past its own bucket spends nothing of its creator's bucket nor of its organization's.

The way out of trouble (an action that reduces or pays: cancel, delete, revoke, remove, budget,
checkout; `tenants.standing.Effect`) counts only in the caller's own bucket: the key's, or for a
signed-in person one that their keys never fill. Whoever floods the organization's buckets, or
a person's bucket with a leaked key, cannot stop the owner revoking that key or cancelling work.

A view names its costly actions in `throttle_scopes` (action or method -> "submit", "upload",
"predict", "invite", "org_create"); each is shared by the organization, or by the person for an
action outside any organization (creating one). Rates come from the API_RATE_LIMITS setting,
read on every request. Each bucket is a fixed window counted with an atomic increment in the
cache (Redis), so parallel requests cannot all pass on one stale count as they would with a
read-then-write history; a request given back in a race may make another wait early, never let
one too many through. On Redis all of a request's buckets are taken by one script, in one round
trip and atomically (no race at all); other caches take them one by one.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache
from rest_framework.throttling import BaseThrottle

from tenants.actors import client_ip
from tenants.cache_client import redis_client
from tenants.models import ApiKey
from tenants.standing import Effect

from .permissions import request_effect, view_action

_PERIOD_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}

# Effects that lower spend or exposure, or pay: never held back by anyone else's requests.
WAY_OUT = frozenset({Effect.REDUCE, Effect.PAY})


def parse_rate(rate: str) -> tuple[int, int]:
    """`"60/min"` -> (60 requests, 60 s): DRF's notation, where the unit's first letter counts."""
    count, _, unit = rate.partition("/")
    return int(count), _PERIOD_S[unit.strip()[0].lower()]


@dataclass(frozen=True)
class Bucket:
    rate: str  # the key of API_RATE_LIMITS
    sharer: str  # whose requests share it


def request_buckets(request, view) -> list[Bucket]:
    """The buckets a request counts in, in the order they are taken: the caller's own first."""
    user = request.user
    if not user.is_authenticated:
        return [Bucket("anon", client_ip(request))]
    auth = getattr(request, "auth", None)
    api_key = auth if isinstance(auth, ApiKey) else None
    if request_effect(view, request) in WAY_OUT:
        return [Bucket("key", str(api_key.pk)) if api_key else Bucket("user", f"{user.pk}:session")]
    buckets = [Bucket("key", str(api_key.pk))] if api_key else []
    buckets.append(Bucket("user", str(user.pk)))
    # Set only after the membership check, so an outsider cannot spend another tenant's bucket.
    organization = getattr(view, "organization", None)
    if organization is not None:
        buckets.append(Bucket("org", str(organization.pk)))
    operation = getattr(view, "throttle_scopes", {}).get(view_action(view, request))
    if operation:
        sharer = f"org:{organization.pk}" if organization is not None else f"user:{user.pk}"
        buckets.append(Bucket(operation, sharer))
    return buckets


# Every bucket in one round trip, atomically: count the request in each in turn; at the first
# bucket past its limit, give back what was counted and say which one it was (1-based; 0: all had
# room). ARGV holds each bucket's limit and window. A new key gets its expiry in the same step,
# so no key can be left without one.
_TAKE = """
for i, key in ipairs(KEYS) do
    local count = redis.call('incr', key)
    if count == 1 then redis.call('expire', key, tonumber(ARGV[2 * i]) + 1) end
    if count > tonumber(ARGV[2 * i - 1]) then
        for j = 1, i do redis.call('decr', KEYS[j]) end
        return i
    end
end
return 0
"""


def _increment(key: str, period: int) -> int:
    cache.add(key, 0, timeout=period + 1)
    try:
        return cache.incr(key)
    except ValueError:  # evicted between add and incr
        cache.set(key, 1, timeout=period + 1)
        return 1


def _give_back(key: str) -> None:
    # A key gone meanwhile had its window end, and the count with it.
    with contextlib.suppress(ValueError):
        cache.decr(key)


def clock() -> float:
    """Now, for the buckets' windows (tests stand it still, so no window ends during one)."""
    return time.time()


def buckets_take(buckets: list[Bucket], *, now: float) -> int | None:
    """Count one request in every bucket, or in none. None when each had room; otherwise the
    seconds until the first full bucket's window ends, and nothing stays counted anywhere."""
    limited = []
    for bucket in buckets:
        rate = settings.API_RATE_LIMITS.get(bucket.rate)
        if rate:
            limit, period = parse_rate(rate)
            key = f"throttle:{bucket.rate}:{bucket.sharer}:{int(now // period)}"
            limited.append((key, limit, period))
    if not limited:
        return None
    client, backend = redis_client()
    if client is not None:
        full = client.eval(
            _TAKE,
            len(limited),
            *(backend.make_and_validate_key(key) for key, _, _ in limited),
            *(n for _, limit, period in limited for n in (limit, period)),
        )
        if not full:
            return None
        period = limited[full - 1][2]
        return max(1, math.ceil(period - now % period))
    taken = []
    for key, limit, period in limited:
        taken.append(key)
        if _increment(key, period) > limit:
            for key in taken:
                _give_back(key)
            return max(1, math.ceil(period - now % period))
    return None


class RateLimit(BaseThrottle):
    """DRF asks every throttle class and counts in each, refused or not; so all buckets are one
    class, which stops at the first full one."""

    retry_after: int | None = None

    def allow_request(self, request, view) -> bool:
        self.retry_after = buckets_take(request_buckets(request, view), now=clock())
        return self.retry_after is None

    def wait(self) -> float | None:
        return self.retry_after


def throttle_wait(request, view) -> int | None:
    """For pages, which DRF does not throttle: the API's buckets for a Django request; the seconds
    to wait when one is full, else None (and the request is counted)."""
    return buckets_take(request_buckets(request, view), now=clock())
