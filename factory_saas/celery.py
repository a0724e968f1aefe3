"""The Celery app: configured from Django settings (CELERY_*), tasks found in each app."""

import os

from celery import Celery
from celery.signals import celeryd_init, worker_ready

from .metrics import multiprocess_dir_reset

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "factory_saas.settings.embedded")

app = Celery("factory_saas")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@celeryd_init.connect
def _metrics_files_reset(**_kwargs):
    # The worker's first signal, before its task modules create their metrics' files and its
    # pool's processes write theirs (multiprocess mode, factory_saas.metrics).
    multiprocess_dir_reset()


@worker_ready.connect
def _metrics_serve(**_kwargs):
    """The control plane's /metrics, where METRICS_PORT is set (its worker only, not beat or
    the GPU workers); started once the pool's processes are forked, so none inherits it."""
    from django.conf import settings

    if settings.METRICS_PORT:
        from .pool_metrics import control_plane_metrics_serve

        control_plane_metrics_serve(port=settings.METRICS_PORT)
