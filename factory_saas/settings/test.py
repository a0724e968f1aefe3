"""Settings for `make test`: the real PostgreSQL and Redis, fast password hashing."""

from .base import *  # noqa: F403
from .base import env

SECRET_KEY = env(
    "SECRET_KEY", default="test-only-key-not-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
)
DEBUG = False

DATABASES = {
    "default": env.db("DATABASE_URL", default="postgres://postgres@127.0.0.1:5432/factory_saas")
}
REDIS_URL = env("REDIS_URL", default="redis://127.0.0.1:6379/0")
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "factory_saas_test",
    }
}
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default=REDIS_URL)

# High enough that no test but the rate-limit tests (which set their own) ever meets one.
API_RATE_LIMITS = dict.fromkeys(API_RATE_LIMITS, "1000000/day")  # noqa: F405

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
STORAGE_BACKEND = env("STORAGE_BACKEND", default="local")
