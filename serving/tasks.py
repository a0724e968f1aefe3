"""Serving's periodic work: reconcile replicas, expire the prediction log."""

from celery import shared_task

from .reconciler import replicas_reconcile as replicas_reconcile_service
from .services import prediction_log_expire as prediction_log_expire_service


@shared_task(
    name="serving.replicas_reconcile", ignore_result=True, soft_time_limit=50, time_limit=60
)
def replicas_reconcile() -> None:
    replicas_reconcile_service()


@shared_task(
    name="serving.prediction_log_expire", ignore_result=True, soft_time_limit=1700, time_limit=1800
)
def prediction_log_expire() -> int:
    return prediction_log_expire_service()
