"""Settings for the baseline gunicorn of bench/upload_memory.py: the test settings, plus the
naive upload view's URL, with no cap on a body read into memory (that is what it measures)."""

from factory_saas.settings.test import *  # noqa: F403

ROOT_URLCONF = "bench.naive_upload_urls"
DATA_UPLOAD_MAX_MEMORY_SIZE = None
