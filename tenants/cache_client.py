"""The Redis client behind the default cache, for the few hot paths that need one round trip
where the cache API takes several (a script, a pipeline).

Django's RedisCache builds a new `redis.Redis` for every call (each one copying redis-py's table
of ~170 response callbacks), which costs more CPU than the round trip on a request that makes a
dozen of them. One client per cache backend instance (Django keeps one per thread) reuses the
backend's own connection pool.
"""

from __future__ import annotations

from django.core.cache import caches
from django.core.cache.backends.redis import RedisCache


def redis_client(alias: str = "default"):
    """(redis.Redis, the backend) for a Redis cache; (None, the backend) for any other, whose
    callers fall back to the cache API (the embedded default's file cache, say)."""
    backend = caches[alias]
    if not isinstance(backend, RedisCache):
        return None, backend
    client = backend.__dict__.get("_hot_path_client")
    if client is None:
        client = backend.__dict__["_hot_path_client"] = backend._cache.get_client(write=True)
    return client, backend
