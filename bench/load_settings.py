"""Settings of bench/load.py's gunicorn: production's, plus the bench's baseline routes.

Only the URLconf differs, so the product's endpoints run exactly as in production.
"""

from factory_saas.settings.production import *  # noqa: F403

ROOT_URLCONF = "bench.load_urls"
# The bench measures capacity, not the limits: the buckets are still counted, never full.
API_RATE_LIMITS = dict.fromkeys(API_RATE_LIMITS, "1000000/day")  # noqa: F405
