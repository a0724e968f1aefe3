"""The periodic drift check (beat: `serving-drift-check`). Apart from serving/tasks.py, which
holds the request path's tasks, so each part of the loop owns its own door."""

from celery import shared_task
from django.conf import settings

from serving.monitoring import drift_check_recent


@shared_task(name="serving.drift_check", ignore_result=True, soft_time_limit=120, time_limit=150)
def drift_check() -> int:
    return drift_check_recent(budget_s=settings.DRIFT_CHECK_BUDGET_S)
