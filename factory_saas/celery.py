"""The Celery app: configured from Django settings (CELERY_*), tasks found in each app."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "factory_saas.settings.embedded")

app = Celery("factory_saas")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
# The loop's tick lives beside serving/tasks.py (the request path's tasks), in its own module.
app.autodiscover_tasks(["serving"], related_name="loop_tasks")
