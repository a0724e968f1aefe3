"""Celery entry points of billing (thin: each calls one service)."""

from datetime import timedelta

from celery import shared_task
from django.utils import timezone

from . import services


@shared_task(name="billing.storage_meter", ignore_result=True)
def storage_meter() -> int:
    # The hour that just ended; a late or repeated run records nothing twice.
    return services.storage_meter(hour=timezone.now() - timedelta(hours=1))


@shared_task(name="billing.budget_alerts", ignore_result=True)
def budget_alerts() -> int:
    return services.budget_alerts_check()


@shared_task(name="billing.plan_credits", ignore_result=True)
def plan_credits() -> int:
    return services.plan_credits_grant()
