"""Production: PostgreSQL, Redis, S3 and Stripe from the environment; no insecure defaults."""

from django.core.checks.security.base import (
    SECRET_KEY_INSECURE_PREFIX,
    SECRET_KEY_MIN_LENGTH,
    SECRET_KEY_MIN_UNIQUE_CHARACTERS,
)
from django.core.exceptions import ImproperlyConfigured

from .base import *  # noqa: F403
from .base import MIDDLEWARE, SECRET_KEY_FALLBACKS, env

# Keys printed in this repository (docker/env.example, the test settings): sessions, CSRF tokens
# and signed upload URLs made with one can be forged by anyone who has read it.
PUBLISHED_SECRET_KEYS = {
    "change-me-this-is-a-public-example-key-0123456789-abcdefghijklmnop",
    "test-only-key-not-secret-0123456789-abcdefghijklmnopqrstuvwxyz",
}


def _refuse_weak_secret_key(name: str, key: str) -> None:
    """Refuse at start what `check --deploy` only warns about (W009/W025), and the published
    examples; the message never repeats the key."""
    make_one = 'Make one with: python -c "import secrets; print(secrets.token_urlsafe(50))"'
    if key in PUBLISHED_SECRET_KEYS:
        raise ImproperlyConfigured(f"{name} is the published example key. {make_one}")
    if (
        len(key) < SECRET_KEY_MIN_LENGTH
        or len(set(key)) < SECRET_KEY_MIN_UNIQUE_CHARACTERS
        or key.startswith(SECRET_KEY_INSECURE_PREFIX)
    ):
        raise ImproperlyConfigured(
            f"{name} is too weak: it needs {SECRET_KEY_MIN_LENGTH}+ characters, "
            f"{SECRET_KEY_MIN_UNIQUE_CHARACTERS}+ distinct ones, and no "
            f"'{SECRET_KEY_INSECURE_PREFIX}' prefix. {make_one}"
        )


SECRET_KEY = env("SECRET_KEY", default="")
if not SECRET_KEY:
    raise ImproperlyConfigured("SECRET_KEY must be set in the environment for production.")
_refuse_weak_secret_key("SECRET_KEY", SECRET_KEY)
for _position, _fallback in enumerate(SECRET_KEY_FALLBACKS):
    _refuse_weak_secret_key(f"SECRET_KEY_FALLBACKS[{_position}]", _fallback)
DEBUG = env.bool("DEBUG", default=False)
if DEBUG:
    raise ImproperlyConfigured("DEBUG must be off in production.")

DATABASES = {"default": env.db("DATABASE_URL")}
DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=60)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
# The reads' statements compiled once per process (tenants.compiled) are prepared once per
# connection too, so PostgreSQL neither parses nor plans them on every request (the job list's:
# 1.2 of its 2 ms of database CPU). Only those: every other query binds in the client as
# Django's default does. A pooler in transaction mode must keep prepared statements
# (PgBouncer 1.21+ with max_prepared_statements); DATABASE_PREPARED_STATEMENTS=false turns
# them off.
if env.bool("DATABASE_PREPARED_STATEMENTS", default=True):
    DATABASES["default"].setdefault("OPTIONS", {})["prepare_threshold"] = 5
REDIS_URL = env("REDIS_URL")
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}
}
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default=REDIS_URL)

SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=True)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = True
SECURE_HSTS_PRELOAD = True
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True
# Probes and Prometheus reach the pod itself over plain HTTP inside the cluster, not through
# the TLS proxy; /metrics still wants its token.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]

# Static files are served by the web process itself, compressed and cache-busted.
MIDDLEWARE = [*MIDDLEWARE[:2], "whitenoise.middleware.WhiteNoiseMiddleware", *MIDDLEWARE[2:]]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}
