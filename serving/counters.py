"""The request path's shared counters, in the cache every process shares (Redis in production):
requests in flight per deployment version and per replica (for autoscaling and least-in-flight
picking), failed health checks in a row, dropped shadow copies, and the throttle on writing
Deployment.last_request_at.

Counters are hints, not ledgers: each one expires, so an increment without its decrement (a web
process killed mid-forward) lasts at most IN_FLIGHT_TTL_S, and readers clamp at zero.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from django.conf import settings
from django.core.cache import cache

from tenants.cache_client import redis_client

# Decrements only the counters that still exist: one that expired stays gone rather than coming
# back at -1 with no expiry.
_DECREMENT_EXISTING = """
for _, key in ipairs(KEYS) do
    if redis.call('exists', key) == 1 then redis.call('decr', key) end
end
return 0
"""


def _in_flight_ttl() -> int:
    return int(settings.SERVING_FORWARD_TIMEOUT_S * 2 + 60)


def _version_key(deployment_id: int, version_id: int) -> str:
    return f"serving:inflight:v:{deployment_id}:{version_id}"


def _replica_key(replica_id: int) -> str:
    return f"serving:inflight:r:{replica_id}"


def _add(key: str, delta: int, *, timeout: int) -> int:
    """Atomic on Redis: create the counter with its expiry if missing, then increment it."""
    cache.add(key, 0, timeout=timeout)
    try:
        return cache.incr(key, delta)
    except ValueError:  # expired between the two calls
        cache.add(key, max(0, delta), timeout=timeout)
        return max(0, delta)


@contextlib.contextmanager
def in_flight(*, deployment_id: int, version_id: int, replica_id: int) -> Iterator[None]:
    keys = (_version_key(deployment_id, version_id), _replica_key(replica_id))
    client, backend = redis_client()
    if client is not None:
        with _in_flight_on_redis(client, backend, keys):
            yield
        return
    for key in keys:
        _add(key, 1, timeout=_in_flight_ttl())
    try:
        yield
    finally:
        for key in keys:
            with contextlib.suppress(ValueError):  # expired meanwhile: nothing to take back
                cache.decr(key)


@contextlib.contextmanager
def _in_flight_on_redis(client, backend, keys: tuple[str, ...]) -> Iterator[None]:
    """The same counts in one round trip each way, on the request path of every predict (the
    cache API's add, incr and decr take ten): SET NX with the expiry then INCR, in one MULTI so
    the key cannot expire in between; the decrements by a script that skips expired keys."""
    names = [backend.make_and_validate_key(key) for key in keys]
    with client.pipeline(transaction=True) as pipe:
        for name in names:
            pipe.set(name, 0, ex=_in_flight_ttl(), nx=True)
            pipe.incr(name)
        pipe.execute()
    try:
        yield
    finally:
        client.eval(_DECREMENT_EXISTING, len(names), *names)


def version_in_flight(*, deployment_id: int, version_id: int) -> int:
    return max(0, int(cache.get(_version_key(deployment_id, version_id)) or 0))


def replicas_in_flight(replica_ids: list[int]) -> dict[int, int]:
    values = cache.get_many([_replica_key(pk) for pk in replica_ids])
    return {pk: max(0, int(values.get(_replica_key(pk)) or 0)) for pk in replica_ids}


def health_failed(replica_id: int) -> int:
    """One more failed health check in a row; how many now."""
    return _add(f"serving:health:{replica_id}", 1, timeout=3600)


def health_passed(replica_id: int) -> None:
    cache.delete(f"serving:health:{replica_id}")


def shadow_dropped(deployment_id: int) -> int:
    return _add(f"serving:shadow_dropped:{deployment_id}", 1, timeout=7 * 86400)


def shadow_dropped_count(deployment_id: int) -> int:
    return int(cache.get(f"serving:shadow_dropped:{deployment_id}") or 0)


def touch_due(deployment_id: int) -> bool:
    """True for at most one request per SERVING_LAST_REQUEST_EVERY_S per deployment: the one
    that writes last_request_at (scale to zero only needs it to that precision)."""
    return cache.add(
        f"serving:touched:{deployment_id}", 1, timeout=max(1, settings.SERVING_LAST_REQUEST_EVERY_S)
    )
