"""factory_saas: an AI factory offered as a service."""

from .celery import app as celery_app

__all__ = ["celery_app"]
