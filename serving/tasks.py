"""Serving's periodic work: reconcile replicas, expire the prediction log, purge deleted
deployments."""

from celery import shared_task

from .reconciler import replicas_reconcile as replicas_reconcile_service
from .services import deployments_purge as deployments_purge_service
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


# Beat runs it every SERVING_PURGE_EVERY_S and a deletion asks for it after its commit; each run
# stops after SERVING_PURGE_BUDGET_S, well inside the time limits, and the next goes on.
@shared_task(
    name="serving.deployments_purge", ignore_result=True, soft_time_limit=240, time_limit=270
)
def deployments_purge() -> int:
    return deployments_purge_service()
