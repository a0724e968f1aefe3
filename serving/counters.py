"""The request path's shared counters, in the cache every process shares (Redis in production):
requests in flight per deployment version and per replica (for autoscaling and least-in-flight
picking), failed health checks in a row, the shadow copies' queues and the copies dropped, and
the throttle on writing Deployment.last_request_at.

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
def in_flight(
    *, deployment_id: int, version_id: int, replica_id: int, touch: bool = False
) -> Iterator[bool]:
    """Count a forward in flight for its version and replica while the block runs. With
    `touch`, the block gets whether this request is the one that writes the deployment's
    last_request_at now (`touch_due`), taken in the same round trip."""
    keys = (_version_key(deployment_id, version_id), _replica_key(replica_id))
    client, backend = redis_client()
    if client is not None:
        touched = _touch_key(deployment_id) if touch else None
        with _in_flight_on_redis(client, backend, keys, touched) as due:
            yield due
        return
    for key in keys:
        _add(key, 1, timeout=_in_flight_ttl())
    try:
        yield touch and touch_due(deployment_id)
    finally:
        for key in keys:
            with contextlib.suppress(ValueError):  # expired meanwhile: nothing to take back
                cache.decr(key)


@contextlib.contextmanager
def _in_flight_on_redis(client, backend, keys: tuple[str, ...], touched: str | None):
    """The same counts in one round trip each way, on the request path of every predict (the
    cache API's add, incr and decr take ten): SET NX with the expiry then INCR, in one MULTI so
    the key cannot expire in between; the decrements by a script that skips expired keys."""
    names = [backend.make_and_validate_key(key) for key in keys]
    with client.pipeline(transaction=True) as pipe:
        for name in names:
            pipe.set(name, 0, ex=_in_flight_ttl(), nx=True)
            pipe.incr(name)
        if touched is not None:
            pipe.set(backend.make_and_validate_key(touched), 1, ex=_touch_every(), nx=True)
        results = pipe.execute()
    try:
        yield touched is not None and bool(results[-1])
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


_DROPPED_TTL_S = 7 * 86400
_SHADOW_QUEUES = "serving:shadow:queues"


def _shadow_queue(deployment_id: int) -> str:
    return f"serving:shadow:q:{deployment_id}"


def shadow_dropped(deployment_id: int) -> int:
    return _add(f"serving:shadow_dropped:{deployment_id}", 1, timeout=_DROPPED_TTL_S)


# Queue a shadow copy unless the deployment's queue is full, in which case count it dropped:
# KEYS queue, dropped counter, the set of queues; ARGV copy, queue limit, the counter's expiry.
_SHADOW_PUSH = """
if redis.call('llen', KEYS[1]) >= tonumber(ARGV[2]) then
    if redis.call('incr', KEYS[2]) == 1 then redis.call('expire', KEYS[2], ARGV[3]) end
    return 0
end
redis.call('rpush', KEYS[1], ARGV[1])
redis.call('sadd', KEYS[3], KEYS[1])
return 1
"""


def shadow_push(deployment_id: int, copy: str) -> bool | None:
    """Queue one shadow copy (JSON) for the control plane to send, in one round trip: True when
    queued, False when the deployment's SERVING_SHADOW_QUEUE copies already wait (the copy is
    dropped and counted), None when the cache is not Redis (the caller sends it another way)."""
    client, backend = redis_client()
    if client is None:
        return None
    keys = [
        backend.make_and_validate_key(_shadow_queue(deployment_id)),
        backend.make_and_validate_key(f"serving:shadow_dropped:{deployment_id}"),
        backend.make_and_validate_key(_SHADOW_QUEUES),
    ]
    return bool(
        client.eval(_SHADOW_PUSH, 3, *keys, copy, settings.SERVING_SHADOW_QUEUE, _DROPPED_TTL_S)
    )


def shadow_pop(*, per_queue: int) -> list[str]:
    """Up to `per_queue` queued copies from each deployment's queue, oldest first; each copy is
    popped once, whoever else pops at the same time."""
    client, backend = redis_client()
    if client is None:
        return []
    queues = backend.make_and_validate_key(_SHADOW_QUEUES)
    names = sorted(client.smembers(queues))
    if not names:
        return []
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.lpop(name, per_queue)
        popped = pipe.execute()
    copies = []
    for name, items in zip(names, popped, strict=True):
        if items:
            copies.extend(item.decode() for item in items)
        else:  # empty: forget it until its next copy adds it again
            client.srem(queues, name)
    return copies


def shadow_dropped_count(deployment_id: int) -> int:
    return int(cache.get(f"serving:shadow_dropped:{deployment_id}") or 0)


def _touch_key(deployment_id: int) -> str:
    return f"serving:touched:{deployment_id}"


def _touch_every() -> int:
    return max(1, settings.SERVING_LAST_REQUEST_EVERY_S)


def touch_due(deployment_id: int) -> bool:
    """True for at most one request per SERVING_LAST_REQUEST_EVERY_S per deployment: the one
    that writes last_request_at (scale to zero only needs it to that precision)."""
    return cache.add(_touch_key(deployment_id), 1, timeout=_touch_every())
