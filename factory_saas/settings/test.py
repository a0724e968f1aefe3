"""Settings for `make test`: the real PostgreSQL and Redis, fast password hashing."""

import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .base import *  # noqa: F403
from .base import BASE_DIR, env

# Under pytest-xdist each worker process gets its own test database (pytest-django's suffix),
# and here its own Redis database and local folders, so one worker's cache flush, Celery queues
# or storage sweep never meet another's. Processes a test starts get these resolved values, not
# the worker's name (tests/pool.py), so the shift happens once.
XDIST_WORKER = env("PYTEST_XDIST_WORKER", default="")


def _per_worker_redis(url: str) -> str:
    if not XDIST_WORKER:
        return url
    parts = urlsplit(url)
    database = int(parts.path.strip("/") or 0) + 1 + int(XDIST_WORKER.removeprefix("gw"))
    return urlunsplit(parts._replace(path=f"/{database}"))


SECRET_KEY = env(
    "SECRET_KEY", default="test-only-key-not-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
)
DEBUG = False

DATABASES = {
    "default": env.db("DATABASE_URL", default="postgres://postgres@127.0.0.1:5432/factory_saas")
}
if DATABASES["default"]["ENGINE"].endswith("postgresql"):
    _options = DATABASES["default"].setdefault("OPTIONS", {})
    # As in production: the compiled reads' statements are prepared per connection
    # (tenants.compiled).
    _options["prepare_threshold"] = 5
    # A commit in the test database returns without waiting for its WAL to reach the disk
    # (about 1.4 ms less per commit here: transactional tests, pool workers, beat). What another
    # connection sees is unchanged; only a crash of the PostgreSQL server could lose the last
    # commits.
    _options["options"] = f"{_options.get('options', '')} -c synchronous_commit=off".strip()
REDIS_URL = _per_worker_redis(env("REDIS_URL", default="redis://127.0.0.1:6379/0"))
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "factory_saas_test",
    }
}
CELERY_BROKER_URL = (
    _per_worker_redis(env("CELERY_BROKER_URL")) if "CELERY_BROKER_URL" in env else REDIS_URL
)

# High enough that no test but the rate-limit tests (which set their own) ever meets one.
API_RATE_LIMITS = dict.fromkeys(API_RATE_LIMITS, "1000000/day")  # noqa: F405

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
STORAGE_BACKEND = env("STORAGE_BACKEND", default="local")
if XDIST_WORKER:
    STORAGE_LOCAL_ROOT = env(
        "STORAGE_LOCAL_ROOT", default=str(BASE_DIR / "var" / f"test-{XDIST_WORKER}" / "storage")
    )
    WORKER_WORKDIR = env(
        "WORKER_WORKDIR", default=str(BASE_DIR / "var" / f"test-{XDIST_WORKER}" / "work")
    )
# Pool workers in tests offer the default runtime as their own interpreter, as `make worker` does.
WORKER_RUNTIMES = env.list(
    "WORKER_RUNTIMES",
    default=[f"{DEFAULT_RUNTIME}={Path(sys.executable).absolute()}"],  # noqa: F405
)
# Attempts in tests are sampled often enough that a second's run shows several samples.
UTILIZATION_SAMPLE_S = env.float("UTILIZATION_SAMPLE_S", default=0.2)
# Replicas in tests bill each second and drain quickly, so a test sees both within seconds.
SERVE_BILLING_INTERVAL_S = env.float("SERVE_BILLING_INTERVAL_S", default=1.0)
SERVE_DRAIN_S = env.float("SERVE_DRAIN_S", default=10.0)
SERVE_UNRESPONSIVE_S = env.float("SERVE_UNRESPONSIVE_S", default=8.0)
# Prediction charges are priced each second, so a real-stack test sees them in the ledger soon.
SERVING_BILL_EVERY_S = env.float("SERVING_BILL_EVERY_S", default=1.0)
CELERY_BEAT_SCHEDULE["serving-predictions-bill"]["schedule"] = SERVING_BILL_EVERY_S  # noqa: F405
# Every request reads its deployment's routes afresh, as tests change them between requests;
# tests/serving/test_routing_cache.py turns the cache on.
SERVING_ROUTING_CACHE_S = env.float("SERVING_ROUTING_CACHE_S", default=0.0)
