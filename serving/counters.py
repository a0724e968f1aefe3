"""The request path's shared counters in Redis: requests in flight per deployment version and per
replica (for autoscaling and least-in-flight picking), failed health checks, dropped shadow
copies, and the throttle on writing Deployment.last_request_at.

Every counter that a crashed process could leave raised expires: an INCR without its DECR (a web
process killed mid-forward) lasts at most IN_FLIGHT_TTL_S past the last request, never forever.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis
from django.conf import settings

_clients: dict[str, redis.Redis] = {}


def client() -> redis.Redis:
    url = settings.REDIS_URL
    if url not in _clients:
        _clients[url] = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    return _clients[url]


def _in_flight_ttl() -> int:
    return int(settings.SERVING_FORWARD_TIMEOUT_S * 2 + 60)


def _version_key(deployment_id: int, version_id: int) -> str:
    return f"serving:inflight:v:{deployment_id}:{version_id}"


def _replica_key(replica_id: int) -> str:
    return f"serving:inflight:r:{replica_id}"


@contextlib.contextmanager
def in_flight(*, deployment_id: int, version_id: int, replica_id: int) -> Iterator[None]:
    keys = (_version_key(deployment_id, version_id), _replica_key(replica_id))
    pipe = client().pipeline()
    for key in keys:
        pipe.incr(key)
        pipe.expire(key, _in_flight_ttl())
    pipe.execute()
    try:
        yield
    finally:
        pipe = client().pipeline()
        for key in keys:
            pipe.decr(key)
        values = pipe.execute()
        for key, value in zip(keys, values, strict=True):
            if value < 0:  # the key expired mid-request: never leave it negative
                client().set(key, 0, ex=_in_flight_ttl())


def version_in_flight(*, deployment_id: int, version_id: int) -> int:
    return max(0, int(client().get(_version_key(deployment_id, version_id)) or 0))


def replicas_in_flight(replica_ids: list[int]) -> dict[int, int]:
    if not replica_ids:
        return {}
    values = client().mget([_replica_key(pk) for pk in replica_ids])
    return {pk: max(0, int(v or 0)) for pk, v in zip(replica_ids, values, strict=True)}


def health_failed(replica_id: int) -> int:
    """One more failed health check in a row; how many now."""
    key = f"serving:health:{replica_id}"
    pipe = client().pipeline()
    pipe.incr(key)
    pipe.expire(key, 3600)
    return int(pipe.execute()[0])


def health_passed(replica_id: int) -> None:
    client().delete(f"serving:health:{replica_id}")


def shadow_dropped(deployment_id: int) -> int:
    return int(client().incr(f"serving:shadow_dropped:{deployment_id}"))


def shadow_dropped_count(deployment_id: int) -> int:
    return int(client().get(f"serving:shadow_dropped:{deployment_id}") or 0)


def touch_due(deployment_id: int) -> bool:
    """True for at most one request per SERVING_LAST_REQUEST_EVERY_S per deployment: the one
    that writes last_request_at (scale to zero only needs it to that precision)."""
    return bool(
        client().set(
            f"serving:touched:{deployment_id}",
            1,
            nx=True,
            ex=max(1, settings.SERVING_LAST_REQUEST_EVERY_S),
        )
    )
